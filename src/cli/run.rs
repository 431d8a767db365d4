//! `casfs run`: execute one Action by digest and print its ActionResult.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use casfs::exec::{CachedExecutor, ExecConfig, Executor, Limits, Materialize, SandboxConfig};
use casfs::fs::FetchConfig;
use casfs::metrics::Metrics;

use casfs::error::Result;

use super::{digest_arg, parse_duration, RemoteArgs, Usage};

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

/// Executor options shared by `casfs run`, `casfs serve` and `casfs worker`.
#[derive(Args, Clone, Debug)]
pub struct ExecArgs {
    /// Scratch space for input mounts, overlays and captured output [default: casfs-exec in
    /// the temp folder; for `serve`, `exec` in its storage folder; for `worker`,
    /// casfs-worker in the temp folder].
    #[arg(long, env = "CASFS_WORK_DIR")]
    pub work_dir: Option<PathBuf>,
    /// Timeout of actions that set none.
    #[arg(long, env = "CASFS_DEFAULT_TIMEOUT", default_value = "15m", value_parser = parse_duration)]
    pub default_timeout: Duration,
    /// Longest timeout an action may ask for.
    #[arg(long, env = "CASFS_MAX_TIMEOUT", default_value = "1h", value_parser = parse_duration)]
    pub max_timeout: Duration,
    /// Most processes an action may run at once (0 = no limit).
    #[arg(long, env = "CASFS_PIDS_LIMIT", default_value_t = 1024)]
    pub pids_limit: u32,
    /// Host folders bound read-only into the action's root (repeatable).
    #[arg(long = "host-dir", env = "CASFS_HOST_DIRS", value_delimiter = ',', default_values = ["/usr", "/bin", "/lib", "/lib64", "/sbin", "/etc"])]
    pub host_dirs: Vec<PathBuf>,
    /// How the input root is provided: auto, lazy (FUSE + overlayfs), eager (hard links).
    #[arg(long, env = "CASFS_MATERIALIZE", default_value = "auto")]
    pub materialize: Materialize,
    /// Run commands as this uid:gid instead of the executor's own.
    #[arg(long, env = "CASFS_RUN_AS", value_parser = parse_ids)]
    pub run_as: Option<(u32, u32)>,
}

impl ExecArgs {
    /// The executor configuration these flags describe; `work_dir` unless --work-dir is given.
    pub fn config(&self, worker_name: String, work_dir: PathBuf) -> ExecConfig {
        ExecConfig {
            materialize: self.materialize,
            work_dir: self.work_dir.clone().unwrap_or(work_dir),
            // An action without a timeout gets the default, never more than the maximum.
            limits: Limits {
                default_timeout: self.default_timeout.min(self.max_timeout),
                max_timeout: self.max_timeout,
            },
            sandbox: SandboxConfig {
                host_dirs: self.host_dirs.clone(),
                pids_limit: self.pids_limit,
                run_as: self.run_as,
            },
            worker_name,
            fetch: FetchConfig::default(),
        }
    }
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
pub async fn run(args: RunArgs) -> Result<std::result::Result<u8, Usage>> {
    let digest = match digest_arg(&args.digest) {
        Ok(d) => d,
        Err(u) => return Ok(Err(u)),
    };
    let store = Arc::new(args.remote.store()?);
    let metrics = Metrics::new();
    let cache = args.cache.open(&metrics)?;
    let cfg = args.exec.config(format!("casfs-run@{}", hostname()), std::env::temp_dir().join("casfs-exec"));
    let stop = super::serve::Shutdown::install();
    let exec = Arc::new(Executor::new(store.clone(), cache, cfg, metrics));
    exec.clean_stale()?;
    let exec = CachedExecutor::new(exec, store);
    // SIGINT/SIGTERM drop the execution: its processes, overlay, mount and scratch folder
    // are undone by their guards before we exit.
    let outcome = tokio::select! {
        o = exec.execute(digest, args.skip_cache_lookup) => o?,
        _ = stop.wait() => {
            return Err(casfs::error::Error::Unavailable("interrupted; the action was stopped and cleaned up".into()));
        }
    };
    if outcome.status.code != 0 {
        eprintln!("casfs: status {}: {}", outcome.status.code, outcome.status.message);
    }
    if outcome.cached {
        eprintln!("casfs: served from the action cache");
    }
    print!("{}", casfs::render::action_result_json(&outcome.result));
    Ok(Ok(exit_status(&outcome)))
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

fn parse_ids(s: &str) -> Result<(u32, u32), String> {
    let (u, g) = s.split_once(':').unwrap_or((s, s));
    Ok((u.parse().map_err(|_| format!("bad uid in {s:?}"))?, g.parse().map_err(|_| format!("bad gid in {s:?}"))?))
}

/// This machine's name, for ExecutedActionMetadata.worker.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}
