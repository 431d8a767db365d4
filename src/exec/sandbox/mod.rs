//! Confines an action's command: the [`Sandbox`] trait with its three implementations
//! (`builtin` namespaces, `bwrap` through bubblewrap, `wrapper` for a site's own runner),
//! the action's cgroup (memory, pids, CPU: `cgroup`), and the run that ties them together:
//! prepare the root, start, wait or time out, kill what is left, report usage.
//!
//! What every sandbox gives the command: the input root as `/` (writable, through the
//! overlay), the host tool folders read-only, a fresh `/proc` of its own PID namespace, a
//! bounded `/tmp`, a few `/dev` nodes, stdin from /dev/null, the Command's environment only,
//! no network unless asked, an unprivileged user (nobody by default) with no capabilities.

mod builtin;
mod bwrap;
pub(crate) mod cgroup;
mod hierarchy;
mod root;
mod sys;
mod view;
mod wrapper;

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use prost::Message;

use crate::error::{Error, Result};
pub use cgroup::{reap_orphans, Usage};

/// Which sandbox runs the commands.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum SandboxKind {
    /// casfs's own namespaces (the default).
    #[default]
    Builtin,
    /// bubblewrap (`bwrap` on the PATH).
    Bwrap,
    /// A site's own runner: these words, then the command (see `wrapper`).
    Wrapper(Vec<String>),
}

/// How commands are confined.
#[derive(Clone, Debug)]
pub struct SandboxConfig {
    /// Host folders bound read-only at the same path inside the root (tools, libraries).
    pub host_dirs: Vec<PathBuf>,
    /// Most processes (and threads) an action may have at once; 0 = no limit.
    pub pids_limit: u32,
    /// Run commands as this host uid/gid instead of nobody (65534:65534).
    pub run_as: Option<(u32, u32)>,
    /// Memory of one action (its processes, page cache and tmpfs together); 0 = no limit.
    pub memory_limit: u64,
    /// Size of the action's `/tmp` (and `/dev/shm`); 0 = half the memory limit (a quarter of
    /// RAM without one).
    pub tmp_size: u64,
    /// Which sandbox.
    pub kind: SandboxKind,
}

/// The uid and gid commands run as unless told otherwise: nobody.
pub const NOBODY: (u32, u32) = (65534, 65534);

/// The default memory limit of one action: half of the machine's RAM.
pub fn default_memory_limit() -> u64 {
    cgroup::total_ram() / 2
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            host_dirs: ["/usr", "/bin", "/lib", "/lib64", "/sbin", "/etc"].iter().map(PathBuf::from).collect(),
            pids_limit: 1024,
            run_as: None,
            memory_limit: default_memory_limit(),
            tmp_size: 0,
            kind: SandboxKind::Builtin,
        }
    }
}

impl SandboxConfig {
    /// The host uid and gid commands run as (and own the folders of their input root).
    pub fn ids(&self) -> (u32, u32) {
        self.run_as.unwrap_or(NOBODY)
    }

    /// The size of `/tmp` in bytes.
    pub fn tmp_bytes(&self) -> u64 {
        match (self.tmp_size, self.memory_limit) {
            (0, 0) => (cgroup::total_ram() / 4).max(64 << 20),
            (0, m) => (m / 2).max(1 << 20),
            (t, _) => t,
        }
    }
}

/// One command to run.
pub struct Job<'a> {
    /// The root the command sees as `/`.
    pub root: &'a Path,
    /// Working directory inside the root (absolute, in the command's view).
    pub cwd: String,
    /// Arguments as the Command gave them (a bare `argv[0]` is looked up in the command's
    /// view once its root is prepared).
    pub argv: &'a [String],
    /// The complete environment.
    pub env: &'a [(String, String)],
    /// Where stdout and stderr go.
    pub stdout: &'a Path,
    /// See `stdout`.
    pub stderr: &'a Path,
    /// Give the command a network namespace of its own (no network) unless true.
    pub network: bool,
    /// Run as root (uid 0, still without capabilities) inside its user namespace.
    pub run_as_root: bool,
    /// Wall-clock limit.
    pub timeout: Duration,
    /// No host folders at all in its view, whatever the sandbox's configuration says.
    pub hermetic: bool,
}

/// How a command ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// It exited with this code (128 + signal when killed by a signal).
    Code(i32),
    /// The timeout expired and every process of the action was killed.
    TimedOut,
}

/// How a command ended and what it used.
#[derive(Clone, Debug)]
pub struct Finished {
    /// The exit; a command whose processes were killed for memory never reports 0.
    pub exit: Exit,
    /// Counters of its cgroup.
    pub usage: Usage,
    /// The memory limit it ran under (0 = none).
    pub memory_limit: u64,
    /// Which sandbox ran it.
    pub sandbox: &'static str,
}

impl Finished {
    /// The usage as an `ExecutedActionMetadata.auxiliary_metadata` entry.
    pub fn to_any(&self) -> prost_types::Any {
        let d = |t: Duration| prost_types::Duration { seconds: t.as_secs() as i64, nanos: t.subsec_nanos() as i32 };
        let m = crate::proto::casfs::ResourceUsage {
            peak_memory_bytes: self.usage.peak_memory,
            user_cpu: Some(d(self.usage.user_cpu)),
            system_cpu: Some(d(self.usage.system_cpu)),
            memory_limit_bytes: self.memory_limit,
            memory_limit_exceeded: self.usage.oom_kills > 0,
            sandbox: self.sandbox.to_string(),
        };
        prost_types::Any {
            type_url: format!("type.googleapis.com/{}", crate::proto::casfs::RESOURCE_USAGE),
            value: m.encode_to_vec(),
        }
    }
}

/// What a sandbox is asked to start.
pub struct Launch<'a> {
    /// The command.
    pub job: &'a Job<'a>,
    /// Its arguments, `argv[0]` resolved in its view.
    pub argv: Vec<String>,
    /// Host folders to bind read-only at the same path; their mount points exist in the root.
    pub host_dirs: Vec<PathBuf>,
    /// Host uid and gid of the command.
    pub host_ids: (u32, u32),
    /// Its uid and gid inside its user namespace (0:0 with `run_as_root`).
    pub inside_ids: (u32, u32),
    /// Bytes of `/tmp`.
    pub tmp_size: u64,
    /// `cgroup.procs` of the action's cgroups: the first process writes `0` to each before
    /// anything else, so all it starts is limited and can be killed.
    pub cgroup_procs: Vec<RawFd>,
}

/// A way to confine one command. Implementations start it and return the pid to wait for;
/// the caller owns waiting, the timeout, killing and cleaning up through the cgroup.
pub trait Sandbox: Send + Sync {
    /// The name reported in logs and resource usage.
    fn name(&self) -> &'static str;
    /// Starts the command (stdin /dev/null, stdout/stderr to the job's files).
    fn start(&self, launch: &Launch<'_>) -> Result<i32>;
}

impl SandboxKind {
    fn sandbox(&self) -> Box<dyn Sandbox> {
        match self {
            SandboxKind::Builtin => Box::new(builtin::Builtin),
            SandboxKind::Bwrap => Box::new(bwrap::Bwrap),
            SandboxKind::Wrapper(words) => Box::new(wrapper::Wrapper(words.clone())),
        }
    }
}

pub(super) fn cstr(s: impl AsRef<[u8]>) -> Result<CString> {
    CString::new(s.as_ref()).map_err(|_| Error::InvalidArgument("argument contains NUL".into()))
}

/// The command's stdio: /dev/null, and its two output files (created, truncated).
fn stdio(job: &Job<'_>) -> Result<(OwnedFd, OwnedFd, OwnedFd)> {
    use crate::error::IoContext;
    let open_w = |p: &Path| -> Result<OwnedFd> {
        Ok(std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(p)
            .ctx(|| format!("opening {}", p.display()))?
            .into())
    };
    let null = std::fs::File::open("/dev/null").ctx(|| "opening /dev/null".into())?;
    Ok((null.into(), open_w(job.stdout)?, open_w(job.stderr)?))
}

/// Runs `job` to completion or timeout.
pub async fn run(cfg: &SandboxConfig, job: Job<'_>) -> Result<Finished> {
    let sandbox = cfg.kind.sandbox();
    // These calls go through the overlay into the action's FUSE mount.
    let wanted: &[PathBuf] = if job.hermetic { &[] } else { &cfg.host_dirs };
    let (host_dirs, argv) = super::blocking(|| {
        let binds = root::prepare(job.root, wanted)?;
        let argv = view::resolve_argv0(job.root, &binds, job.argv, job.env, &job.cwd)?;
        Ok::<_, Error>((binds, argv))
    })?;
    let cg = cgroup::ActionCgroup::create(cfg.memory_limit, cfg.pids_limit)?;
    let host_ids = cfg.ids();
    let launch = Launch {
        job: &job,
        argv,
        host_dirs,
        host_ids,
        inside_ids: if job.run_as_root { (0, 0) } else { host_ids },
        tmp_size: cfg.tmp_bytes(),
        cgroup_procs: cg.procs.iter().map(|f| f.as_raw_fd()).collect(),
    };
    // The built-in sandbox's mounts resolve paths through the FUSE mount too.
    let pid = super::blocking(|| sandbox.start(&launch))?;
    // Whatever happens from here (timeout, the caller dropping this future on shutdown, a
    // panic), the action's processes do not outlive it.
    let mut guard = ChildGuard { pid, cgroup: Some(cg), reaped: false };
    let exit = match tokio::time::timeout(job.timeout, reap(pid)).await {
        Ok(status) => Exit::Code(status),
        Err(_) => {
            guard.kill();
            reap(pid).await;
            Exit::TimedOut
        }
    };
    guard.reaped = true;
    let Some(cg) = guard.cgroup.take() else { return Err(Error::Internal("the action's cgroup is gone".into())) };
    // Whatever the first process left behind is killed with it.
    cg.drain().await;
    let usage = cg.usage();
    cg.remove().await;
    let mut done = Finished { exit, usage, memory_limit: cfg.memory_limit, sandbox: sandbox.name() };
    tracing::info!(
        sandbox = done.sandbox,
        peak_memory = usage.peak_memory,
        user_cpu_ms = usage.user_cpu.as_millis() as u64,
        system_cpu_ms = usage.system_cpu.as_millis() as u64,
        oom_kills = usage.oom_kills,
        "action resources"
    );
    if usage.oom_kills > 0 {
        // A killed process of the action means its result is not what it meant to compute.
        if let Exit::Code(c) = &mut done.exit {
            if *c == 0 {
                *c = 128 + libc::SIGKILL;
            }
        }
        let limit = match cfg.memory_limit {
            0 => "the memory all actions may use together".to_string(),
            m => format!("its memory limit of {} MiB", m >> 20),
        };
        let note = format!(
            "\ncasfs: the action went over {limit}: the kernel killed {} of its processes (peak {} MiB)\n",
            usage.oom_kills,
            usage.peak_memory >> 20
        );
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new().append(true).open(job.stderr) {
            let _ = f.write_all(note.as_bytes());
        }
        tracing::warn!(limit = cfg.memory_limit, peak = usage.peak_memory, "an action went over its memory limit");
    }
    Ok(done)
}

/// Kills the action (its first process and everything in its cgroup) unless it was reaped.
struct ChildGuard {
    pid: i32,
    cgroup: Option<cgroup::ActionCgroup>,
    reaped: bool,
}

impl ChildGuard {
    fn kill(&self) {
        // SAFETY: kill(2) of our own unreaped child: the pid cannot have been reused.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        if let Some(cg) = &self.cgroup {
            cg.kill_all();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if !self.reaped {
            self.kill();
            let mut status = 0;
            // SAFETY: waits for our own child, which was just sent SIGKILL.
            unsafe { libc::waitpid(self.pid, &mut status, 0) };
        }
    }
}

/// Waits for `pid` without blocking the runtime; returns its exit code (128 + signal).
/// A pidfd says exactly when the child exits; kernels without one are polled.
async fn reap(pid: i32) -> i32 {
    // SAFETY: pidfd_open of our own child; the result is checked before use.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    // SAFETY: a non-negative result is a fresh descriptor nobody else owns.
    let pidfd = (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) });
    // SAFETY: the AsyncFd owns the OwnedFd, which stays open and unchanged until it drops.
    let ready = pidfd.and_then(|fd| unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE).ok()
    });
    loop {
        let mut status = 0;
        // SAFETY: non-blocking waitpid on our own child into a local.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            if libc::WIFEXITED(status) {
                return libc::WEXITSTATUS(status);
            }
            if libc::WIFSIGNALED(status) {
                return 128 + libc::WTERMSIG(status);
            }
        } else if r < 0 {
            return 255;
        }
        match &ready {
            Some(fd) => {
                if let Ok(mut g) = fd.readable().await {
                    // Readable stays true once the child has exited; waitpid above reaps it.
                    g.retain_ready();
                } else {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            None => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}
