//! The executor's flags, shared by `casfs run`, `casfs serve` and `casfs worker`.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use casfs::exec::sandbox::{default_memory_limit, SandboxKind};
use casfs::exec::{ExecConfig, Limits, Materialize, ProfileConfig, SandboxConfig};
use casfs::fs::FetchConfig;

use super::{parse_duration, parse_size};

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
    /// Host folders bound read-only into the action's root (repeatable); a folder the input
    /// root has itself is never bound over it.
    #[arg(long = "host-dir", env = "CASFS_HOST_DIRS", value_delimiter = ',', default_values = ["/usr", "/bin", "/lib", "/lib64", "/sbin", "/etc"])]
    pub host_dirs: Vec<PathBuf>,
    /// No host folders at all: a command sees only its input root (plus /proc, /dev and
    /// /tmp), as a sysroot build (BuildStream) expects. An action can ask for the same with
    /// the platform property `hermetic=true`.
    #[arg(long, env = "CASFS_HERMETIC", conflicts_with = "host_dirs")]
    pub hermetic: bool,
    /// How the input root is provided: auto, lazy (FUSE + overlayfs), eager (hard links).
    #[arg(long, env = "CASFS_MATERIALIZE", default_value = "auto")]
    pub materialize: Materialize,
    /// Run commands as this host uid:gid [default: nobody, 65534:65534]. They own the input
    /// root's folders; the command is this user inside a user namespace of its own.
    #[arg(long, env = "CASFS_RUN_AS", value_parser = parse_ids)]
    pub run_as: Option<(u32, u32)>,
    /// Let actions whose platform has `run-as-root=true` run as uid 0 of their user
    /// namespace (still the unprivileged host user, without capabilities).
    #[arg(long, env = "CASFS_ALLOW_ROOT_ACTIONS")]
    pub allow_root_actions: bool,
    /// Memory of one action, its processes, page cache and /tmp together (e.g. 4G; 0 = no
    /// limit) [default: half of RAM]. A process over it is killed by the kernel and the
    /// action fails (exit 137, a note on its stderr). All actions of one executor together
    /// stay below three quarters of RAM (or this limit, if higher).
    #[arg(long, env = "CASFS_MEMORY_LIMIT", value_parser = parse_size)]
    pub memory_limit: Option<u64>,
    /// Size of an action's /tmp and /dev/shm [default: half the memory limit].
    #[arg(long, env = "CASFS_TMP_SIZE", value_parser = parse_size)]
    pub tmp_size: Option<u64>,
    /// Which sandbox runs commands: builtin (casfs's own namespaces) or bwrap (bubblewrap,
    /// Debian package bubblewrap).
    #[arg(long, env = "CASFS_SANDBOX", value_enum, default_value = "builtin")]
    pub sandbox: SandboxChoice,
    /// Run each command through this site runner instead: its words (split on whitespace),
    /// then the command's argv; the root, ids and limits in CASFS_SANDBOX_* variables (see
    /// the README). It runs as root in the action's cgroup and must confine the command.
    #[arg(long, env = "CASFS_SANDBOX_WRAPPER", conflicts_with = "sandbox")]
    pub sandbox_wrapper: Option<String>,
    /// Access profiles (lazy input roots): record which inputs an action looked up, keep
    /// that in the action cache, and prefetch it at the next run of the same command; with
    /// no profile yet, prefetch the whole input root in the background. on or off.
    #[arg(long, env = "CASFS_PROFILES", default_value = "on", value_parser = parse_on_off, action = clap::ArgAction::Set)]
    pub profiles: bool,
    /// Most bytes one run prefetches (a profile's files, or the whole input root).
    #[arg(long, env = "CASFS_PREFETCH_BUDGET", default_value = "512M", value_parser = parse_size)]
    pub prefetch_budget: u64,
}

/// The sandboxes `--sandbox` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SandboxChoice {
    /// casfs's own namespaces.
    Builtin,
    /// bubblewrap.
    Bwrap,
}

impl ExecArgs {
    /// The access-profile settings these flags describe.
    pub fn profiles(&self) -> ProfileConfig {
        ProfileConfig { enabled: self.profiles, budget: self.prefetch_budget }
    }

    /// The executor configuration these flags describe; `work_dir` unless --work-dir is given.
    pub fn config(&self, worker_name: String, work_dir: PathBuf) -> ExecConfig {
        if self.run_as.is_some_and(|(uid, _)| uid == 0) {
            tracing::warn!("--run-as 0: actions have no capabilities but may read what only root may read in the host folders (/etc/shadow)");
        }
        ExecConfig {
            materialize: self.materialize,
            work_dir: self.work_dir.clone().unwrap_or(work_dir),
            // An action without a timeout gets the default, never more than the maximum.
            limits: Limits {
                default_timeout: self.default_timeout.min(self.max_timeout),
                max_timeout: self.max_timeout,
                allow_root_actions: self.allow_root_actions,
            },
            sandbox: SandboxConfig {
                host_dirs: if self.hermetic { Vec::new() } else { self.host_dirs.clone() },
                pids_limit: self.pids_limit,
                run_as: self.run_as,
                memory_limit: self.memory_limit.unwrap_or_else(default_memory_limit),
                tmp_size: self.tmp_size.unwrap_or(0),
                kind: match (&self.sandbox_wrapper, self.sandbox) {
                    (Some(w), _) => SandboxKind::Wrapper(w.split_whitespace().map(String::from).collect()),
                    (None, SandboxChoice::Builtin) => SandboxKind::Builtin,
                    (None, SandboxChoice::Bwrap) => SandboxKind::Bwrap,
                },
            },
            worker_name,
            fetch: FetchConfig::default(),
        }
    }
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("{s:?} is not on or off")),
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
