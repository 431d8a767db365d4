//! `casfs execute`: build an Action from a command line, upload it with its inputs, run it
//! on a remote Execution service, wait, and show (or download) the result.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Args;

use casfs::cas::execution::{execute as remote_execute, stage_name};
use casfs::cas::{Cas, GrpcStore};
use casfs::digest::{Digest, DigestFunction, Hasher};
use casfs::error::{Error, IoContext, Result};
use casfs::proto::reapi;

use super::make_action::{upload_action, ActionArgs};
use super::CmdResult;

/// Options of `casfs execute`.
#[derive(Args)]
pub struct ExecuteArgs {
    /// Run even if the action cache has a result.
    #[arg(long)]
    pub skip_cache_lookup: bool,
    /// Download the outputs into this folder (created if missing).
    #[arg(long)]
    pub download: Option<PathBuf>,
    /// Print the ActionResult as JSON instead of the command's stdout.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub action: ActionArgs,
}

/// Runs the action remotely. Exits with the command's exit code (1 when the server reports
/// a failure such as a timeout or missing inputs).
pub async fn execute(args: ExecuteArgs) -> CmdResult {
    let store = args.action.remote.store()?;
    let action = upload_action(&args.action, &store).await?;
    eprintln!("casfs: action {action}");
    let resp = remote_execute(&store, action, args.skip_cache_lookup, |name, stage| {
        eprintln!("casfs: {name} {}", stage_name(stage));
    })
    .await?;
    let status = resp.status.clone().unwrap_or_default();
    let Some(result) = resp.result else {
        return Err(Error::remote(
            "Execute",
            tonic::Status::new(tonic::Code::from_i32(status.code), status.message.clone()),
        )
        .into());
    };
    if args.json {
        print!("{}", casfs::render::action_result_json(&result));
    } else {
        let mut out = tokio::io::stdout();
        copy_output(&store, action.function(), &result.stdout_raw, &result.stdout_digest, &mut out, "stdout").await?;
    }
    let mut err = tokio::io::stderr();
    copy_output(&store, action.function(), &result.stderr_raw, &result.stderr_digest, &mut err, "stderr").await?;
    if let Some(dir) = &args.download {
        download(&store, action.function(), &result, dir).await?;
    }
    eprintln!(
        "casfs: exit code {}{}; {} files, {} dirs, {} symlinks",
        result.exit_code,
        if resp.cached_result { " (cached)" } else { "" },
        result.output_files.len(),
        result.output_directories.len(),
        result.output_symlinks.len() + result.output_file_symlinks.len() + result.output_directory_symlinks.len()
    );
    let _ = std::io::stdout().flush();
    if status.code != 0 {
        eprintln!("casfs: status {:?}: {}", tonic::Code::from_i32(status.code), status.message);
        std::process::exit(1);
    }
    if result.exit_code != 0 {
        std::process::exit(result.exit_code.clamp(1, 255));
    }
    Ok(())
}

/// Writes a command's stdout or stderr to `to` as it arrives (inline bytes, or the blob
/// read with ByteStream in chunks, never held whole), hashing it on the way: bytes that do
/// not match their digest are an error after they were written.
async fn copy_output(
    store: &GrpcStore,
    function: DigestFunction,
    raw: &[u8],
    digest: &Option<reapi::Digest>,
    to: &mut (impl tokio::io::AsyncWrite + Unpin),
    name: &str,
) -> Result<()> {
    use futures::StreamExt;
    use tokio::io::AsyncWriteExt;
    if !raw.is_empty() {
        to.write_all(raw).await.ctx(|| format!("writing {name}"))?;
        return to.flush().await.ctx(|| format!("writing {name}"));
    }
    let Some(d) = digest else { return Ok(()) };
    let d = Digest::from_proto_with(function, d)?;
    let mut stream = store.read_stream(&d, 0, 0).await?;
    let mut hasher = Hasher::new_with(d.function());
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        hasher.update(&chunk);
        to.write_all(&chunk).await.ctx(|| format!("writing {name}"))?;
    }
    to.flush().await.ctx(|| format!("writing {name}"))?;
    let actual = hasher.finish();
    if actual != d {
        return Err(Error::DigestMismatch { expected: Box::new(d), actual: Box::new(actual) });
    }
    Ok(())
}

/// Writes the outputs of `r` under `dir`: files with their executable bit, directories from
/// their root Directory, symlinks as symlinks.
async fn download(store: &GrpcStore, function: DigestFunction, r: &reapi::ActionResult, dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for f in &r.output_files {
        let path = safe_join(dir, &f.path)?;
        let d = Digest::from_proto_with(
            function,
            f.digest.as_ref().ok_or_else(|| Error::InvalidArgument("file without digest".into()))?,
        )?;
        make_parent(&path)?;
        store.read_to_file(&d, &path).await?;
        let mode = if f.is_executable { 0o755 } else { 0o644 };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .ctx(|| format!("chmod {}", path.display()))?;
    }
    for d in &r.output_directories {
        let path = safe_join(dir, &d.path)?;
        match &d.root_directory_digest {
            Some(root) => {
                casfs::transfer::download_dir(store, &Digest::from_proto_with(function, root)?, &path, false).await?;
            }
            None => eprintln!("casfs: output directory {} has no root_directory_digest; not downloaded", d.path),
        }
    }
    let links = r.output_symlinks.iter().chain(&r.output_file_symlinks).chain(&r.output_directory_symlinks);
    for l in links {
        let path = safe_join(dir, &l.path)?;
        make_parent(&path)?;
        let _ = std::fs::remove_file(&path);
        std::os::unix::fs::symlink(&l.target, &path).ctx(|| format!("symlink {}", path.display()))?;
    }
    Ok(())
}

fn make_parent(path: &Path) -> Result<()> {
    match path.parent() {
        Some(p) => std::fs::create_dir_all(p).ctx(|| format!("creating {}", p.display())),
        None => Ok(()),
    }
}

/// `dir/rel`, refusing output paths that would land outside `dir`.
fn safe_join(dir: &Path, rel: &str) -> Result<PathBuf> {
    casfs::exec::spec::check_relative(rel, "output path")?;
    Ok(dir.join(rel))
}
