//! `casfs run`: execute one Action by digest and print its ActionResult.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use casfs::cas::DiskStore;
use casfs::exec::{ExecConfig, Executor, Limits, Materialize, SandboxConfig};
use casfs::fs::FetchConfig;
use casfs::metrics::Metrics;

use super::{digest_arg, parse_duration, parse_size, CmdResult, RemoteArgs};

/// Options of `casfs run`.
#[derive(Args)]
pub struct RunArgs {
    /// Action digest, HASH/SIZE or HASH-SIZE.
    pub digest: String,
    #[command(flatten)]
    pub remote: RemoteArgs,
    /// Local blob cache shared with mounts.
    #[arg(long, env = "CASFS_CACHE_DIR", default_value_os_t = super::default_storage().with_file_name("blobs"))]
    pub cache_dir: PathBuf,
    /// Bound of the local blob cache.
    #[arg(long, env = "CASFS_CACHE_SIZE", default_value = "10G", value_parser = parse_size)]
    pub cache_size: u64,
    /// Scratch space for input mounts, overlays and captured output.
    #[arg(long, env = "CASFS_WORK_DIR", default_value_os_t = std::env::temp_dir().join("casfs-exec"))]
    pub work_dir: PathBuf,
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
    #[arg(long, env = "CASFS_MATERIALIZE", value_enum, default_value = "auto")]
    pub materialize: Materialize,
    /// Run commands as this uid:gid instead of the executor's own.
    #[arg(long, env = "CASFS_RUN_AS", value_parser = parse_ids)]
    pub run_as: Option<(u32, u32)>,
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
    let cache = Arc::new(DiskStore::open(&args.cache_dir, args.cache_size)?);
    let cfg = ExecConfig {
        materialize: args.materialize,
        work_dir: args.work_dir.clone(),
        limits: Limits { default_timeout: args.default_timeout, max_timeout: args.max_timeout },
        sandbox: SandboxConfig { host_dirs: args.host_dirs.clone(), pids_limit: args.pids_limit, run_as: args.run_as },
        worker_name: format!("casfs-run@{}", hostname()),
        fetch: FetchConfig::default(),
        cache_results: true,
    };
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

fn parse_ids(s: &str) -> Result<(u32, u32), String> {
    let (u, g) = s.split_once(':').unwrap_or((s, s));
    Ok((u.parse().map_err(|_| format!("bad uid in {s:?}"))?, g.parse().map_err(|_| format!("bad gid in {s:?}"))?))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}
