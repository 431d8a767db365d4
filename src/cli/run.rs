//! `casfs run`: execute one Action by digest and print its ActionResult.

use std::sync::Arc;

use clap::Args;

use casfs::exec::Executor;
use casfs::metrics::Metrics;

use super::executor::{hostname, ExecutorArgs};
use super::{digest_arg, CmdResult, RemoteArgs};

/// Options of `casfs run`.
#[derive(Args)]
pub struct RunArgs {
    /// Action digest, HASH/SIZE or HASH-SIZE.
    pub digest: String,
    #[command(flatten)]
    pub remote: RemoteArgs,
    #[command(flatten)]
    pub exec: ExecutorArgs,
    /// Skip the action cache lookup (the result is still cached).
    #[arg(long)]
    pub skip_cache_lookup: bool,
}

/// Runs the action and prints `status` and the ActionResult as JSON.
pub async fn run(args: RunArgs) -> CmdResult {
    let digest = match digest_arg(&args.digest) {
        Ok(d) => d,
        Err(u) => return Ok(Err(u)),
    };
    let store = Arc::new(args.remote.store()?);
    let cache = args.exec.cache()?;
    let cfg = args.exec.config(format!("casfs-run@{}", hostname()), "casfs-exec");
    let exec = Executor::new(store.clone(), store, cache, cfg, Metrics::new());
    exec.clean_stale()?;
    // SIGINT/SIGTERM drop the execution: its processes, overlay, mount and scratch folder
    // are undone by their guards before we exit.
    let outcome = tokio::select! {
        o = exec.execute(digest, args.skip_cache_lookup) => o?,
        _ = super::serve::shutdown_signal() => {
            return Err(casfs::error::Error::Unavailable("interrupted; the action was stopped and cleaned up".into()));
        }
    };
    if outcome.status.code != 0 {
        eprintln!("casfs: status {}: {}", outcome.status.code, outcome.status.message);
    }
    if outcome.cached {
        eprintln!("casfs: served from the action cache");
    }
    print!("{}", casfs::fs::render::action_result_json(&outcome.result));
    Ok(Ok(()))
}
