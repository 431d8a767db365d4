//! `casfs asset fetch|push`: the Remote Asset API from scripts.

use clap::{Args, Subcommand};

use casfs::cas::asset::{self, AssetKind};

use super::{digest_arg, usage, CmdResult, RemoteArgs};

/// What `casfs asset` does.
#[derive(Subcommand)]
pub enum AssetCmd {
    /// Print the digest the server has for a URI (downloading it, if the server may).
    Fetch(FetchArgs),
    /// Tell the server that a URI names a blob (or, with --directory, a Directory tree)
    /// already in its CAS.
    Push(PushArgs),
}

/// Options of `casfs asset fetch`.
#[derive(Args)]
pub struct FetchArgs {
    /// URIs naming the same content (the server uses the first it can).
    #[arg(required = true)]
    uris: Vec<String>,
    #[command(flatten)]
    name: NameArgs,
    #[command(flatten)]
    remote: RemoteArgs,
}

/// Options of `casfs asset push`.
#[derive(Args)]
pub struct PushArgs {
    /// The blob (or root Directory) digest, HASH/SIZE.
    digest: String,
    /// URIs that name it.
    #[arg(required = true)]
    uris: Vec<String>,
    #[command(flatten)]
    name: NameArgs,
    #[command(flatten)]
    remote: RemoteArgs,
}

/// What narrows a name besides its URIs.
#[derive(Args)]
struct NameArgs {
    /// A qualifier NAME=VALUE (repeatable), e.g. checksum.sri=sha256-BASE64.
    #[arg(long = "qualifier", short = 'q')]
    qualifiers: Vec<String>,
    /// A Directory tree rather than a blob.
    #[arg(long)]
    directory: bool,
}

impl NameArgs {
    fn parts(&self) -> Result<(AssetKind, Vec<(String, String)>), super::CliError> {
        let mut q = Vec::new();
        for s in &self.qualifiers {
            let Some((n, v)) = s.split_once('=') else {
                return Err(usage(format!("--qualifier {s:?} is not NAME=VALUE")));
            };
            q.push((n.to_string(), v.to_string()));
        }
        Ok((if self.directory { AssetKind::Directory } else { AssetKind::Blob }, q))
    }
}

/// Runs `casfs asset ...`.
pub async fn run(cmd: AssetCmd) -> CmdResult {
    match cmd {
        AssetCmd::Fetch(a) => {
            let (kind, q) = a.name.parts()?;
            let digest = asset::fetch(&a.remote.store()?, kind, &a.uris, &q).await?;
            println!("{digest}");
        }
        AssetCmd::Push(a) => {
            let (kind, q) = a.name.parts()?;
            let digest = digest_arg(&a.digest)?;
            asset::push(&a.remote.store()?, kind, &a.uris, &q, &digest).await?;
        }
    }
    Ok(())
}
