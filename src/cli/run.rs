//! `casfs run`: execute one Action by digest and print its ActionResult.

use std::sync::Arc;

use clap::Args;

use casfs::exec::{CachedExecutor, Executor};
use casfs::metrics::Metrics;

use super::exec_args::{hostname, ExecArgs};
use super::signals::Shutdown;
use super::{CmdResult, RemoteArgs};

/// Options of `casfs run`.
#[derive(Args)]
pub struct RunArgs {
    /// Action digest, HASH/SIZE or HASH-SIZE.
    pub digest: String,
    #[command(flatten)]
    pub remote: RemoteArgs,
    #[command(flatten)]
    pub cache: super::CacheArgs,
    #[command(flatten)]
    pub exec: ExecArgs,
    /// Skip the action cache lookup (the result is still cached).
    #[arg(long)]
    pub skip_cache_lookup: bool,
}

/// What the exit status of `casfs run` says (shown by `casfs run --help`).
pub const EXIT_STATUS_HELP: &str = "Exit status:
  0  the command ran and exited 0 (or its successful result came from the action cache)
  1  casfs could not run it: a missing Action, Command or input, a CAS or sandbox failure,
     an interruption (the ActionResult, if any, is still printed)
  2  usage error (bad arguments, a malformed digest)
  3  the command ran and exited non-zero (its exit code is in the printed ActionResult)
  4  the action timed out (killed; its stdout, stderr and outputs are still attached)";

/// Exit status: the command ran and exited 0.
pub const EXIT_OK: u8 = 0;
/// Exit status: casfs could not run the command (infrastructure, missing inputs, an error).
pub const EXIT_NOT_RUN: u8 = 1;
/// Exit status: the command ran and exited non-zero.
pub const EXIT_COMMAND_FAILED: u8 = 3;
/// Exit status: the action timed out.
pub const EXIT_TIMED_OUT: u8 = 4;

/// Runs the action, prints `status` and the ActionResult as JSON, and returns the exit
/// status that tells how it went (`EXIT_STATUS_HELP`).
pub async fn run(args: RunArgs) -> CmdResult<u8> {
    let digest = args.remote.digest(&args.digest)?;
    let store = Arc::new(args.remote.store()?);
    let metrics = Metrics::new();
    let cache = args.cache.open(&metrics)?;
    let mut cfg = args.exec.config(format!("casfs-run@{}", hostname()), std::env::temp_dir().join("casfs-exec"));
    cfg.fetch = args.cache.fetch_config();
    let stop = Shutdown::install();
    let exec = Arc::new(Executor::new(store.clone(), cache, cfg, metrics).with_profiles(args.exec.profiles()));
    exec.clean_stale()?;
    let exec = CachedExecutor::new(exec, store);
    // SIGINT/SIGTERM drop the execution: its processes, overlay, mount and scratch folder
    // are undone by their guards before we exit.
    let outcome = tokio::select! {
        o = exec.execute(digest, args.skip_cache_lookup) => o?,
        _ = stop.wait() => {
            return Err(casfs::error::Error::Unavailable("interrupted; the action was stopped and cleaned up".into()).into());
        }
    };
    if outcome.status.code != 0 {
        eprintln!("casfs: status {}: {}", outcome.status.code, outcome.status.message);
    }
    if outcome.cached {
        eprintln!("casfs: served from the action cache");
    }
    print!("{}", casfs::render::action_result_json(&outcome.result));
    Ok(exit_status(&outcome))
}

/// The exit status for an outcome: timeouts and infrastructure failures first, since a
/// killed command's exit code means nothing.
fn exit_status(o: &casfs::exec::Outcome) -> u8 {
    match tonic::Code::from_i32(o.status.code) {
        tonic::Code::Ok if o.result.exit_code == 0 => EXIT_OK,
        tonic::Code::Ok => {
            eprintln!("casfs: the command exited with code {}", o.result.exit_code);
            EXIT_COMMAND_FAILED
        }
        tonic::Code::DeadlineExceeded => EXIT_TIMED_OUT,
        _ => EXIT_NOT_RUN,
    }
}
