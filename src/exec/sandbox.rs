//! Runs a command as PID 1 of new mount, PID, IPC, UTS (and network) namespaces, chrooted
//! into the prepared input root with a few host folders bound in, a pids limit, a clean
//! environment and stdin from /dev/null. Killing PID 1 ends every process of the action.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, IoContext, Result};

/// How commands are confined.
#[derive(Clone, Debug)]
pub struct SandboxConfig {
    /// Host folders bound read-only at the same path inside the root (tools, libraries).
    pub host_dirs: Vec<PathBuf>,
    /// Most processes (and threads) an action may have at once; 0 = no limit.
    pub pids_limit: u32,
    /// Run as this uid/gid instead of the executor's own.
    pub run_as: Option<(u32, u32)>,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            host_dirs: ["/usr", "/bin", "/lib", "/lib64", "/sbin", "/etc"].iter().map(PathBuf::from).collect(),
            pids_limit: 1024,
            run_as: None,
        }
    }
}

/// One command to run.
pub struct Job<'a> {
    /// The root the command sees as `/`.
    pub root: &'a Path,
    /// Working directory inside the root (absolute, in the command's view).
    pub cwd: String,
    /// Arguments; `argv[0]` already resolved.
    pub argv: &'a [String],
    /// The complete environment.
    pub env: &'a [(String, String)],
    /// Where stdout and stderr go.
    pub stdout: &'a Path,
    /// See `stdout`.
    pub stderr: &'a Path,
    /// Give the command a network namespace of its own (no network) unless true.
    pub network: bool,
    /// Wall-clock limit.
    pub timeout: Duration,
}

/// How a command ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// It exited with this code (128 + signal when killed by a signal).
    Code(i32),
    /// The timeout expired and every process of the action was killed.
    TimedOut,
}

fn cstr(s: impl AsRef<[u8]>) -> Result<CString> {
    CString::new(s.as_ref()).map_err(|_| Error::InvalidArgument("argument contains NUL".into()))
}

/// Everything the child needs, prepared before clone (the child only makes system calls).
struct ChildPlan {
    root: CString,
    binds: Vec<(CString, CString)>,
    proc_dir: CString,
    tmp_dir: CString,
    dev_binds: Vec<(CString, CString)>,
    cwd: CString,
    argv: Vec<CString>,
    env: Vec<CString>,
    stdin: OwnedFd,
    stdout: OwnedFd,
    stderr: OwnedFd,
    sync_read: OwnedFd,
    run_as: Option<(u32, u32)>,
    /// NULL-terminated pointer arrays into `argv`/`env`, built before clone: the child must
    /// not allocate (another thread may have held the allocator's lock at fork time).
    argv_ptrs: Vec<*const libc::c_char>,
    env_ptrs: Vec<*const libc::c_char>,
}

const STACK: usize = 1 << 20;

// SAFETY: the raw pointers point into CStrings the plan owns; moving the plan between
// threads moves neither those buffers nor changes what the pointers refer to.
unsafe impl Send for ChildPlan {}

/// Clones the child into its namespaces; returns its pid.
fn spawn_child(plan: &ChildPlan, flags: i32) -> Result<i32> {
    let mut stack = vec![0u8; STACK];
    let plan_ptr = plan as *const ChildPlan as *mut libc::c_void;
    // SAFETY: the child runs `child_main` on its own stack with a copy of our address space
    // (no CLONE_VM); `plan` and `stack` outlive the clone call.
    let pid = unsafe { libc::clone(child_main, stack.as_mut_ptr().add(STACK) as *mut libc::c_void, flags, plan_ptr) };
    if pid < 0 {
        return Err(Error::io("starting the sandboxed command (clone)", std::io::Error::last_os_error()));
    }
    Ok(pid)
}

/// The pids cgroup (v1 controller or v2 unified) an action runs in; removed on drop.
struct PidsCgroup(PathBuf);

impl PidsCgroup {
    fn create(limit: u32) -> Option<Self> {
        if limit == 0 {
            return None;
        }
        let name = format!("casfs-{}-{}", std::process::id(), rand::random::<u32>());
        for base in ["/sys/fs/cgroup/pids", "/sys/fs/cgroup"] {
            let base = Path::new(base);
            if !base.join("cgroup.procs").exists() {
                continue;
            }
            let dir = base.join(&name);
            if std::fs::create_dir(&dir).is_ok() {
                if std::fs::write(dir.join("pids.max"), limit.to_string()).is_ok() {
                    return Some(PidsCgroup(dir));
                }
                let _ = std::fs::remove_dir(&dir);
            }
        }
        tracing::warn!("no pids cgroup available: the pids limit is not enforced");
        None
    }

    fn add(&self, pid: i32) -> Result<()> {
        std::fs::write(self.0.join("cgroup.procs"), pid.to_string())
            .ctx(|| format!("adding {pid} to {}", self.0.display()))
    }

    /// Removes the cgroup once its last process is gone, polling briefly without blocking
    /// the runtime (the kernel empties it a moment after PID 1 is reaped).
    async fn remove(self) {
        for _ in 0..1000 {
            if std::fs::remove_dir(&self.0).is_ok() {
                std::mem::forget(self);
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // Drop tries once more and reports.
    }
}

/// Kills the processes of actions whose executor died (SIGKILL, crash) and removes their
/// pids cgroups: `casfs-PID-N` where no process PID exists any more. Returns how many
/// processes were killed. Cgroups of live executors are never touched.
pub fn reap_orphans() -> usize {
    let mut killed = 0;
    for base in ["/sys/fs/cgroup/pids", "/sys/fs/cgroup"] {
        let Ok(rd) = std::fs::read_dir(base) else { continue };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(owner) = name.strip_prefix("casfs-").and_then(|r| r.split('-').next()) else { continue };
            let Ok(owner) = owner.parse::<u32>() else { continue };
            if owner == std::process::id() || Path::new(&format!("/proc/{owner}")).exists() {
                continue;
            }
            let dir = e.path();
            for _ in 0..50 {
                let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                let pids: Vec<i32> = procs.lines().filter_map(|l| l.trim().parse().ok()).collect();
                if pids.is_empty() {
                    break;
                }
                for pid in pids {
                    if unsafe { libc::kill(pid, libc::SIGKILL) } == 0 {
                        killed += 1;
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if let Err(err) = std::fs::remove_dir(&dir) {
                tracing::warn!(cgroup = %dir.display(), error = %err, "could not remove a dead executor's cgroup");
            }
        }
    }
    if killed > 0 {
        tracing::warn!(processes = killed, "killed the processes of actions whose executor died");
    }
    killed
}

impl Drop for PidsCgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if std::fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        tracing::warn!(cgroup = %self.0.display(), "could not remove the action's cgroup");
    }
}

extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the ChildPlan the parent keeps alive until the child has exec'd or
    // exited; only async-signal-safe calls follow.
    let p = unsafe { &*(arg as *const ChildPlan) };
    unsafe {
        let mut b = [0u8; 1];
        // Wait until the parent has put us in the cgroup.
        libc::read(p.sync_read.as_raw_fd(), b.as_mut_ptr() as *mut libc::c_void, 1);
        let fail = |step: u8| -> libc::c_int {
            let msg = [b'c', b'a', b's', b'f', b's', b':', b' ', b's', b't', b'e', b'p', b' ', step, b'\n'];
            libc::write(2, msg.as_ptr() as *const libc::c_void, msg.len());
            127
        };
        if libc::dup2(p.stdin.as_raw_fd(), 0) < 0
            || libc::dup2(p.stdout.as_raw_fd(), 1) < 0
            || libc::dup2(p.stderr.as_raw_fd(), 2) < 0
        {
            return 127;
        }
        let null = std::ptr::null();
        if libc::mount(null, c"/".as_ptr(), null, libc::MS_REC | libc::MS_PRIVATE, null as _) != 0 {
            return fail(b'a');
        }
        for (src, dst) in &p.binds {
            if libc::mount(src.as_ptr(), dst.as_ptr(), null, libc::MS_BIND | libc::MS_REC, null as _) != 0 {
                return fail(b'b');
            }
            let flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;
            libc::mount(null, dst.as_ptr(), null, flags, null as _);
        }
        for (src, dst) in &p.dev_binds {
            libc::mount(src.as_ptr(), dst.as_ptr(), null, libc::MS_BIND, null as _);
        }
        if libc::mount(
            c"proc".as_ptr(),
            p.proc_dir.as_ptr(),
            c"proc".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            null as _,
        ) != 0
        {
            return fail(b'p');
        }
        libc::mount(
            c"tmpfs".as_ptr(),
            p.tmp_dir.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            null as _,
        );
        if libc::chroot(p.root.as_ptr()) != 0 || libc::chdir(p.cwd.as_ptr()) != 0 {
            return fail(b'r');
        }
        libc::sethostname(c"casfs".as_ptr(), 5);
        if let Some((uid, gid)) = p.run_as {
            if libc::setgroups(0, std::ptr::null()) != 0 || libc::setgid(gid) != 0 || libc::setuid(uid) != 0 {
                return fail(b'u');
            }
        }
        libc::execve(p.argv_ptrs[0], p.argv_ptrs.as_ptr(), p.env_ptrs.as_ptr());
        let e = *libc::__errno_location();
        // 127 like a shell: command not found or not executable.
        if e == libc::ENOENT || e == libc::EACCES || e == libc::ENOEXEC {
            let msg = b"casfs: cannot execute the command\n";
            libc::write(2, msg.as_ptr() as *const libc::c_void, msg.len());
        }
        127
    }
}

fn mkdir_p(root: &Path, inside: &Path) -> Result<PathBuf> {
    let rel = inside.strip_prefix("/").unwrap_or(inside);
    let p = root.join(rel);
    if std::fs::symlink_metadata(&p).is_err() {
        std::fs::create_dir_all(&p).ctx(|| format!("creating mount point {}", p.display()))?;
    }
    Ok(p)
}

fn touch(root: &Path, inside: &str) -> Result<PathBuf> {
    let p = root.join(inside.trim_start_matches('/'));
    if std::fs::symlink_metadata(&p).is_err() {
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).ctx(|| format!("creating {}", parent.display()))?;
        }
        std::fs::File::create(&p).ctx(|| format!("creating {}", p.display()))?;
    }
    Ok(p)
}

/// The mount points a sandbox adds to a root (to be left out of captured outputs).
pub fn scaffold_paths(cfg: &SandboxConfig) -> Vec<String> {
    let mut v: Vec<String> =
        cfg.host_dirs.iter().map(|d| d.to_string_lossy().trim_start_matches('/').to_string()).collect();
    v.extend(["proc", "tmp", "dev"].map(String::from));
    v
}

/// Runs `job` to completion or timeout.
pub async fn run(cfg: &SandboxConfig, job: Job<'_>) -> Result<Exit> {
    let bytes = |p: &Path| p.as_os_str().as_bytes().to_vec();
    // Host tool folders: the input root's own entries win (an input folder named `lib`
    // stays the input's); a host symlink (`/lib -> usr/lib` on merged-usr systems) is
    // recreated as a symlink; a host folder is bound read-only.
    // These calls go through the overlay into the action's FUSE mount.
    let (binds, dev_binds, proc_dir, tmp_dir) = super::blocking(|| -> Result<_> {
        let mut binds = Vec::new();
        for d in &cfg.host_dirs {
            let inside = job.root.join(d.strip_prefix("/").unwrap_or(d));
            if std::fs::symlink_metadata(&inside).is_ok() {
                tracing::debug!(dir = %d.display(), "the input root has its own; not binding the host's");
                continue;
            }
            match std::fs::symlink_metadata(d) {
                Ok(m) if m.file_type().is_symlink() => {
                    let target = std::fs::read_link(d).ctx(|| format!("readlink {}", d.display()))?;
                    std::os::unix::fs::symlink(&target, &inside).ctx(|| format!("linking {}", inside.display()))?;
                }
                Ok(m) if m.is_dir() => {
                    let dst = mkdir_p(job.root, d)?;
                    binds.push((cstr(bytes(d))?, cstr(bytes(&dst))?));
                }
                _ => {}
            }
        }
        let mut dev_binds = Vec::new();
        for dev in ["/dev/null", "/dev/zero", "/dev/random", "/dev/urandom", "/dev/full"] {
            let dst = touch(job.root, dev)?;
            dev_binds.push((cstr(dev)?, cstr(bytes(&dst))?));
        }
        let proc_dir = mkdir_p(job.root, Path::new("/proc"))?;
        let tmp_dir = mkdir_p(job.root, Path::new("/tmp"))?;
        Ok((binds, dev_binds, proc_dir, tmp_dir))
    })?;
    let open_w = |p: &Path| -> Result<OwnedFd> {
        Ok(std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(p)
            .ctx(|| format!("opening {}", p.display()))?
            .into())
    };
    let (sync_read, sync_write) = {
        let mut fds = [0; 2];
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(Error::io("pipe", std::io::Error::last_os_error()));
        }
        use std::os::fd::FromRawFd;
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    };
    let mut plan = Box::new(ChildPlan {
        root: cstr(bytes(job.root))?,
        binds,
        proc_dir: cstr(bytes(&proc_dir))?,
        tmp_dir: cstr(bytes(&tmp_dir))?,
        dev_binds,
        cwd: cstr(&job.cwd)?,
        argv: job.argv.iter().map(cstr).collect::<Result<_>>()?,
        env: job.env.iter().map(|(k, v)| cstr(format!("{k}={v}"))).collect::<Result<_>>()?,
        stdin: std::fs::File::open("/dev/null").ctx(|| "opening /dev/null".into())?.into(),
        stdout: open_w(job.stdout)?,
        stderr: open_w(job.stderr)?,
        sync_read,
        run_as: cfg.run_as,
        argv_ptrs: Vec::new(),
        env_ptrs: Vec::new(),
    });
    plan.argv_ptrs = plan.argv.iter().map(|a| a.as_ptr()).chain(std::iter::once(std::ptr::null())).collect();
    plan.env_ptrs = plan.env.iter().map(|a| a.as_ptr()).chain(std::iter::once(std::ptr::null())).collect();
    let cgroup = PidsCgroup::create(cfg.pids_limit);
    let mut flags = libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS | libc::SIGCHLD;
    if !job.network {
        flags |= libc::CLONE_NEWNET;
    }
    let pid = spawn_child(&plan, flags)?;
    if let Some(cg) = &cgroup {
        if let Err(e) = cg.add(pid) {
            unsafe { libc::kill(pid, libc::SIGKILL) };
            reap(pid).await;
            return Err(e);
        }
    }
    // Whatever happens from here (timeout, the caller dropping this future on shutdown, a
    // panic), the action's processes do not outlive it.
    let mut guard = ChildGuard { pid, reaped: false };
    // Release the child.
    unsafe { libc::write(sync_write.as_raw_fd(), b"g".as_ptr() as *const libc::c_void, 1) };
    drop(sync_write);
    drop(plan);
    let res = tokio::time::timeout(job.timeout, reap(pid)).await;
    let exit = match res {
        Ok(status) => Exit::Code(status),
        Err(_) => {
            // PID 1 of the namespace: killing it kills every process of the action.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            reap(pid).await;
            Exit::TimedOut
        }
    };
    guard.reaped = true;
    if let Some(cg) = cgroup {
        cg.remove().await;
    }
    Ok(exit)
}

/// Kills and reaps the action's PID 1 unless it was already reaped.
struct ChildGuard {
    pid: i32,
    reaped: bool,
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if !self.reaped {
            unsafe {
                libc::kill(self.pid, libc::SIGKILL);
                let mut status = 0;
                libc::waitpid(self.pid, &mut status, 0);
            }
        }
    }
}

/// Waits for `pid` without blocking the runtime; returns its exit code (128 + signal).
/// A pidfd says exactly when the child exits; kernels without one are polled.
async fn reap(pid: i32) -> i32 {
    use std::os::fd::FromRawFd;
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    let pidfd = (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) });
    // SAFETY: the AsyncFd owns the OwnedFd, which stays open and unchanged until it drops.
    let ready = pidfd.and_then(|fd| unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE).ok()
    });
    loop {
        let mut status = 0;
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
