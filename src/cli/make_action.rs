//! `casfs action`: build a Command and an Action from a command line, upload them (and the
//! input folder), print the Action digest for `casfs run` or a remote executor.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use prost::Message;

use casfs::cas::{Cas, GrpcStore};
use casfs::digest::Digest;
use casfs::error::{Error, Result};
use casfs::proto::reapi;

use super::{parse_duration, CmdResult, RemoteArgs};

/// Options of `casfs action`.
#[derive(Args)]
pub struct ActionArgs {
    /// Upload this folder as the input root.
    #[arg(long, conflicts_with = "input_root")]
    pub input: Option<PathBuf>,
    /// Use this Directory digest as the input root.
    #[arg(long)]
    pub input_root: Option<String>,
    /// Working directory, relative to the input root.
    #[arg(long, default_value = "")]
    pub workdir: String,
    /// Expected output path (v2.1 output_paths; repeatable).
    #[arg(long = "output-path")]
    pub output_paths: Vec<String>,
    /// Expected output file (v2.0 field; repeatable).
    #[arg(long = "output-file")]
    pub output_files: Vec<String>,
    /// Expected output directory (v2.0 field; repeatable).
    #[arg(long = "output-dir")]
    pub output_dirs: Vec<String>,
    /// Environment variable NAME=VALUE (repeatable; nothing else is inherited).
    #[arg(long = "env")]
    pub env: Vec<String>,
    /// Platform property NAME=VALUE (repeatable).
    #[arg(long = "platform")]
    pub platform: Vec<String>,
    /// Action timeout.
    #[arg(long, value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// Never cache this action's result.
    #[arg(long)]
    pub do_not_cache: bool,
    /// How output directories are reported: tree-only (a Tree; casfs adds the root
    /// Directory too), directory-only (a root Directory, no Tree) or tree-and-directory.
    #[arg(long, default_value = "tree-only", value_parser = parse_output_directory_format)]
    pub output_directory_format: i32,
    /// The command line.
    #[arg(last = true, required = true)]
    pub argv: Vec<String>,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

/// Command.OutputDirectoryFormat by name (REAPI numbers 0, 1, 2).
fn parse_output_directory_format(s: &str) -> std::result::Result<i32, String> {
    match s {
        "tree-only" => Ok(0),
        "directory-only" => Ok(1),
        "tree-and-directory" => Ok(2),
        _ => Err(format!("{s:?}: expected tree-only, directory-only or tree-and-directory")),
    }
}

fn pair(s: &str, what: &str) -> Result<(String, String)> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| Error::InvalidArgument(format!("{what} {s:?} is not NAME=VALUE")))
}

/// Builds the Command and Action, uploads them (and the input folder), prints the Action
/// digest.
pub async fn create(args: ActionArgs) -> CmdResult {
    let store = args.remote.store()?;
    println!("{}", upload_action(&args, &store).await?);
    Ok(())
}

/// Uploads the input root, Command and Action that `args` describe; the Action's digest.
pub async fn upload_action(args: &ActionArgs, store: &GrpcStore) -> CmdResult<Digest> {
    let f = args.remote.digest_function;
    let root = match (&args.input, &args.input_root) {
        (Some(dir), _) => casfs::transfer::upload_dir_with(f, store, dir, false).await?.root,
        (None, Some(d)) => args.remote.digest(d)?,
        (None, None) => casfs::tree::Directory::default().encode_with(f).0,
    };
    let mut env: Vec<(String, String)> = args.env.iter().map(|e| pair(e, "--env")).collect::<Result<_>>()?;
    env.sort();
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v.dedup();
        v
    };
    let properties = args
        .platform
        .iter()
        .map(|p| pair(p, "--platform").map(|(name, value)| reapi::platform::Property { name, value }))
        .collect::<Result<Vec<_>>>()?;
    let platform = (!properties.is_empty()).then_some(reapi::Platform { properties });
    let command = reapi::Command {
        arguments: args.argv.clone(),
        environment_variables: env
            .into_iter()
            .map(|(name, value)| reapi::command::EnvironmentVariable { name, value })
            .collect(),
        output_files: sorted(args.output_files.clone()),
        output_directories: sorted(args.output_dirs.clone()),
        output_paths: sorted(args.output_paths.clone()),
        output_directory_format: args.output_directory_format,
        platform: platform.clone(),
        working_directory: args.workdir.clone(),
        ..Default::default()
    };
    let cb = command.encode_to_vec();
    let cd = Digest::of_bytes_with(f, &cb);
    store.write(&cd, cb.into()).await?;
    let action = reapi::Action {
        command_digest: Some(cd.to_proto()),
        input_root_digest: Some(root.to_proto()),
        timeout: args
            .timeout
            .map(|t| prost_types::Duration { seconds: t.as_secs() as i64, nanos: t.subsec_nanos() as i32 }),
        do_not_cache: args.do_not_cache,
        platform,
        ..Default::default()
    };
    let ab = action.encode_to_vec();
    let ad = Digest::of_bytes_with(f, &ab);
    store.write(&ad, ab.into()).await?;
    Ok(ad)
}
