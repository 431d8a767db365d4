//! Executor options shared by `casfs run` and `casfs worker`, and the config they build.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use casfs::cas::DiskStore;
use casfs::error::Result;
use casfs::exec::{ExecConfig, Limits, Materialize, SandboxConfig};
use casfs::fs::FetchConfig;

use super::{parse_duration, parse_size};

/// How actions are run: caches, scratch space, timeouts and confinement.
#[derive(Args, Clone, Debug)]
pub struct ExecutorArgs {
    /// Local blob cache shared with mounts.
    #[arg(long, env = "CASFS_CACHE_DIR", default_value_os_t = super::default_storage().with_file_name("blobs"))]
    pub cache_dir: PathBuf,
    /// Bound of the local blob cache.
    #[arg(long, env = "CASFS_CACHE_SIZE", default_value = "10G", value_parser = parse_size)]
    pub cache_size: u64,
    /// Scratch space for input mounts, overlays and captured output; leftovers of a killed
    /// executor are cleared at start, so no two executors may share it [default:
    /// $TMPDIR/casfs-exec for run, $TMPDIR/casfs-worker for worker]
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
    #[arg(long, env = "CASFS_MATERIALIZE", value_enum, default_value = "auto")]
    pub materialize: Materialize,
    /// Run commands as this uid:gid instead of the executor's own.
    #[arg(long, env = "CASFS_RUN_AS", value_parser = parse_ids)]
    pub run_as: Option<(u32, u32)>,
}

impl ExecutorArgs {
    /// The executor config, with `default_work_dir` (under the temp folder) unless
    /// `--work-dir` was given.
    pub fn config(&self, worker_name: String, default_work_dir: &str) -> ExecConfig {
        ExecConfig {
            materialize: self.materialize,
            work_dir: self.work_dir(default_work_dir),
            limits: Limits { default_timeout: self.default_timeout, max_timeout: self.max_timeout },
            sandbox: SandboxConfig {
                host_dirs: self.host_dirs.clone(),
                pids_limit: self.pids_limit,
                run_as: self.run_as,
            },
            worker_name,
            fetch: FetchConfig::default(),
            cache_results: true,
        }
    }

    /// The scratch folder: `--work-dir` or `default_work_dir` under the temp folder.
    pub fn work_dir(&self, default_work_dir: &str) -> PathBuf {
        self.work_dir.clone().unwrap_or_else(|| std::env::temp_dir().join(default_work_dir))
    }

    /// Opens the local blob cache.
    pub fn cache(&self) -> Result<Arc<DiskStore>> {
        Ok(Arc::new(DiskStore::open(&self.cache_dir, self.cache_size)?))
    }
}

/// Parses `UID:GID` (or a lone `ID` for both).
fn parse_ids(s: &str) -> Result<(u32, u32), String> {
    let (u, g) = s.split_once(':').unwrap_or((s, s));
    Ok((u.parse().map_err(|_| format!("bad uid in {s:?}"))?, g.parse().map_err(|_| format!("bad gid in {s:?}"))?))
}

/// This host's name, for ExecutedActionMetadata.worker and bot ids.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}
