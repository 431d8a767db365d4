//! The built-in sandbox. The command's first process is cloned as PID 1 of new mount, PID,
//! IPC, UTS (and network) namespaces; as real root it joins the action's cgroups, takes a
//! cgroup namespace, builds the view (host folders bound read-only, `/dev`, `/proc` with
//! masked paths, a sized `/tmp`), `pivot_root`s into the input root and detaches the old
//! one. Only then does it enter a user namespace of its own, mapped by the executor to one
//! unprivileged host uid and gid, drop every capability (bounding set too), forbid nested
//! user namespaces, set `no_new_privs` and exec the command.
//!
//! Every namespace but the user namespace belongs to the host's initial user namespace, so
//! the command has no capability over its mounts, network, hostname or processes, even as
//! root of its user namespace: it cannot unmount, remount or add mounts, and a namespace it
//! made itself would copy the mounts locked. Host processes are outside its PID namespace.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::sys::{self, mount, read_pipe, reap_now};
use super::{cstr, Launch, Sandbox};
use crate::error::{Error, IoContext, Result};

/// The built-in namespaces sandbox.
pub struct Builtin;

/// Paths of `/proc` covered by /dev/null, as runc does: kernel memory, keys, timers.
const PROC_NULL: [&str; 6] = ["kcore", "keys", "timer_list", "sched_debug", "latency_stats", "kallsyms"];
/// Folders of `/proc` covered by an empty read-only tmpfs.
const PROC_EMPTY: [&str; 3] = ["acpi", "scsi", "asound"];
/// Paths of `/proc` made read-only.
const PROC_RO: [&str; 5] = ["sys", "sysrq-trigger", "irq", "bus", "fs"];
/// Device nodes bound from the host into the action's `/dev` tmpfs.
const DEV_NODES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

/// Everything the child needs, prepared before clone: the child only makes system calls.
struct Plan {
    cgroup_procs: Vec<RawFd>,
    root: CString,
    binds: Vec<(CString, CString)>,
    dev: CString,
    dev_opts: CString,
    dev_nodes: Vec<(CString, CString)>,
    dev_links: Vec<(CString, CString)>,
    dev_shm: CString,
    proc_dir: CString,
    proc_null: Vec<CString>,
    proc_empty: Vec<CString>,
    proc_ro: Vec<CString>,
    proc_sys_user: CString,
    tmp: CString,
    tmp_opts: CString,
    cwd: CString,
    argv: Vec<CString>,
    env: Vec<CString>,
    /// NULL-terminated pointer arrays into `argv`/`env`, built before clone: the child must
    /// not allocate (another thread may have held the allocator's lock at clone time).
    argv_ptrs: Vec<*const libc::c_char>,
    env_ptrs: Vec<*const libc::c_char>,
    stdio: [OwnedFd; 3],
    to_parent: OwnedFd,
    from_parent: OwnedFd,
    network: bool,
    inside: (u32, u32),
    last_cap: libc::c_int,
}

impl Plan {
    fn new(l: &Launch<'_>, to_parent: OwnedFd, from_parent: OwnedFd) -> Result<Box<Plan>> {
        let job = l.job;
        let root = job.root;
        let under = |inside: &str| cstr(root.join(inside.trim_start_matches('/')).as_os_str().as_bytes());
        let mut binds = Vec::new();
        for d in &l.host_dirs {
            let dst = root.join(d.strip_prefix("/").unwrap_or(d));
            binds.push((cstr(d.as_os_str().as_bytes())?, cstr(dst.as_os_str().as_bytes())?));
        }
        let (stdin, stdout, stderr) = super::stdio(job)?;
        let mut plan = Box::new(Plan {
            cgroup_procs: l.cgroup_procs.clone(),
            root: cstr(root.as_os_str().as_bytes())?,
            binds,
            dev: under("dev")?,
            dev_opts: cstr(format!("mode=0755,size={}", l.tmp_size))?,
            dev_nodes: DEV_NODES
                .iter()
                .filter(|n| Path::new("/dev").join(n).exists())
                .map(|n| Ok((cstr(format!("/dev/{n}"))?, under(&format!("dev/{n}"))?)))
                .collect::<Result<_>>()?,
            dev_links: [("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1")]
                .into_iter()
                .chain([("stderr", "/proc/self/fd/2")])
                .map(|(n, t)| Ok((cstr(t)?, under(&format!("dev/{n}"))?)))
                .collect::<Result<_>>()?,
            dev_shm: under("dev/shm")?,
            proc_dir: under("proc")?,
            proc_null: PROC_NULL.iter().map(|p| under(&format!("proc/{p}"))).collect::<Result<_>>()?,
            proc_empty: PROC_EMPTY.iter().map(|p| under(&format!("proc/{p}"))).collect::<Result<_>>()?,
            proc_ro: PROC_RO.iter().map(|p| under(&format!("proc/{p}"))).collect::<Result<_>>()?,
            proc_sys_user: under("proc/sys/user")?,
            tmp: under("tmp")?,
            tmp_opts: cstr(format!("mode=1777,size={}", l.tmp_size))?,
            cwd: cstr(&job.cwd)?,
            argv: l.argv.iter().map(cstr).collect::<Result<_>>()?,
            env: job.env.iter().map(|(k, v)| cstr(format!("{k}={v}"))).collect::<Result<_>>()?,
            argv_ptrs: Vec::new(),
            env_ptrs: Vec::new(),
            stdio: [stdin, stdout, stderr],
            to_parent,
            from_parent,
            network: job.network,
            inside: l.inside_ids,
            last_cap: sys::last_cap(),
        });
        plan.argv_ptrs = plan.argv.iter().map(|a| a.as_ptr()).chain(std::iter::once(std::ptr::null())).collect();
        plan.env_ptrs = plan.env.iter().map(|a| a.as_ptr()).chain(std::iter::once(std::ptr::null())).collect();
        Ok(plan)
    }
}

const STACK: usize = 256 << 10;

impl Sandbox for Builtin {
    fn name(&self) -> &'static str {
        "builtin"
    }

    fn start(&self, l: &Launch<'_>) -> Result<i32> {
        let (from_child, to_parent) = sys::pipe()?;
        let (from_parent, to_child) = sys::pipe()?;
        let plan = Plan::new(l, to_parent, from_parent)?;
        let mut flags =
            libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS | libc::SIGCHLD;
        if !l.job.network {
            flags |= libc::CLONE_NEWNET;
        }
        let mut stack = vec![0u8; STACK];
        let arg = &*plan as *const Plan as *mut libc::c_void;
        // SAFETY: without CLONE_VM the child runs `child_main` on `stack` in its own copy of
        // our memory, where `plan` stays valid until it execs or exits; both outlive the call.
        let pid = unsafe { libc::clone(child_main, stack.as_mut_ptr().add(STACK).cast(), flags, arg) };
        if pid < 0 {
            return Err(Error::io("starting the sandboxed command (clone)", std::io::Error::last_os_error()));
        }
        // Our copies of the child's ends: closed, so a child that dies early reads as EOF.
        drop(plan);
        // The child says `u` once in its user namespace, then nothing until exec closes the
        // pipe; anything else is why it could not set the sandbox up (an infrastructure
        // failure, never the command's exit code).
        let deadline = std::time::Instant::now() + sys::SETUP_TIMEOUT;
        let fd = from_child.as_raw_fd();
        let mut said = Vec::new();
        let first = read_pipe(fd, true, deadline, &mut said);
        if first.is_ok() && said == b"u" {
            said.clear();
            if let Err(e) = write_maps(pid, l.inside_ids, l.host_ids) {
                reap_now(pid);
                return Err(e);
            }
            // SAFETY: write(2) of one static byte to a pipe we own.
            unsafe { libc::write(to_child.as_raw_fd(), b"g".as_ptr().cast(), 1) };
        }
        if let Err(e) = first.and_then(|_| read_pipe(fd, false, deadline, &mut said)) {
            reap_now(pid);
            return Err(e);
        }
        if !said.is_empty() {
            reap_now(pid);
            let why = String::from_utf8_lossy(&said).trim().to_string();
            return Err(Error::Internal(format!("the sandbox could not start the command: {why}")));
        }
        Ok(pid)
    }
}

/// Maps the one inside uid/gid onto the host's (unprivileged) ones.
fn write_maps(pid: i32, inside: (u32, u32), host: (u32, u32)) -> Result<()> {
    for (file, i, h) in [("uid_map", inside.0, host.0), ("gid_map", inside.1, host.1)] {
        let path = format!("/proc/{pid}/{file}");
        std::fs::write(&path, format!("{i} {h} 1\n")).ctx(|| format!("writing {path}"))?;
    }
    Ok(())
}

extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the Plan in this child's copy of the parent's memory, alive until
    // exec; `child` makes only async-signal-safe calls.
    unsafe { child(&*(arg as *const Plan)) }
}

/// The child: steps as real root in the new namespaces, then the user namespace.
///
/// # Safety
/// Only in the freshly cloned child; async-signal-safe calls only.
unsafe fn child(p: &Plan) -> libc::c_int {
    // Setup failures go to the executor (and stderr); a working directory or command that
    // is not there is the action's own failure (exit 127, the reason on its stderr).
    let fail = |what: &'static [u8]| -> libc::c_int {
        // SAFETY: async-signal-safe message and exit code.
        unsafe { sys::fail_to(&[2, p.to_parent.as_raw_fd()], what) }
    };
    // SAFETY: (the whole block) system calls on NUL-terminated strings and descriptors of the
    // plan, which this process owns a copy of; pointers are NULL or valid for each call.
    unsafe {
        if !sys::join_cgroups(&p.cgroup_procs) {
            return fail(b"joining the action's cgroup");
        }
        for (i, fd) in p.stdio.iter().enumerate() {
            if libc::dup2(fd.as_raw_fd(), i as libc::c_int) < 0 {
                return 127;
            }
        }
        // No controlling terminal: /dev/tty cannot reach the executor's.
        libc::setsid();
        // Its own cgroup namespace, rooted at the action's cgroup.
        if libc::unshare(libc::CLONE_NEWCGROUP) != 0 {
            return fail(b"unshare(cgroup)");
        }
        if !mount(None, c"/", None, libc::MS_REC | libc::MS_PRIVATE, None) {
            return fail(b"making mounts private");
        }
        // pivot_root needs the new root to be a mount point.
        if !mount(Some(&p.root), &p.root, None, libc::MS_BIND | libc::MS_REC, None) {
            return fail(b"binding the root");
        }
        for (src, dst) in &p.binds {
            if !mount(Some(src), dst, None, libc::MS_BIND | libc::MS_REC, None) || !sys::make_read_only(dst, 0) {
                return fail(b"binding a host folder read-only");
            }
        }
        if let Err(what) = dev(p) {
            return fail(what);
        }
        if let Err(what) = proc(p) {
            return fail(what);
        }
        let nosuid_nodev = libc::MS_NOSUID | libc::MS_NODEV;
        if !mount(Some(c"tmpfs"), &p.tmp, Some(c"tmpfs"), nosuid_nodev, Some(&p.tmp_opts)) {
            return fail(b"mounting /tmp");
        }
        // The old root goes: stacked under the new one by pivot_root(".", "."), then detached.
        if libc::chdir(p.root.as_ptr()) != 0
            || libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) != 0
            || libc::umount2(c".".as_ptr(), libc::MNT_DETACH) != 0
            || libc::chdir(c"/".as_ptr()) != 0
        {
            return fail(b"pivot_root");
        }
        libc::sethostname(c"casfs".as_ptr(), 5);
        if !p.network {
            loopback_up();
        }
        if libc::unshare(libc::CLONE_NEWUSER) != 0 {
            return fail(b"unshare(user)");
        }
        let mut b = [0u8; 1];
        if libc::write(p.to_parent.as_raw_fd(), b"u".as_ptr().cast(), 1) != 1
            || libc::read(p.from_parent.as_raw_fd(), b.as_mut_ptr().cast(), 1) != 1
        {
            return fail(b"waiting for the uid map");
        }
        // No user namespaces below this one (their kernel surface is an attacker's
        // favourite). Opened now, the file is this namespace's own limit, not the host's.
        let fd = libc::open(c"/proc/sys/user/max_user_namespaces".as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
            return fail(b"disabling nested user namespaces");
        }
        libc::close(fd);
        if !sys::drop_bounding_set(p.last_cap) {
            return fail(b"dropping capabilities");
        }
        if let Err(what) = sys::become_user(p.inside.0, p.inside.1) {
            return fail(what);
        }
        if libc::chdir(p.cwd.as_ptr()) != 0 {
            return sys::fail(b"entering the working directory");
        }
        sys::reset_signals();
        sys::close_inherited_fds();
        libc::execve(p.argv_ptrs[0], p.argv_ptrs.as_ptr(), p.env_ptrs.as_ptr());
        // 127 like a shell: command not found or not executable.
        sys::fail(b"executing the command")
    }
}

/// A tmpfs `/dev` with the usual nodes bound from the host, links into `/proc/self/fd` and
/// a world-writable `shm` folder.
///
/// # Safety
/// Async-signal-safe.
unsafe fn dev(p: &Plan) -> Result<(), &'static [u8]> {
    // SAFETY: system calls on the plan's NUL-terminated paths.
    unsafe {
        if !mount(Some(c"tmpfs"), &p.dev, Some(c"tmpfs"), libc::MS_NOSUID | libc::MS_NOEXEC, Some(&p.dev_opts)) {
            return Err(b"mounting /dev");
        }
        for (src, dst) in &p.dev_nodes {
            let fd = libc::open(dst.as_ptr(), libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC, 0o644);
            if fd < 0 {
                return Err(b"creating a /dev node");
            }
            libc::close(fd);
            if !mount(Some(src), dst, None, libc::MS_BIND, None) {
                return Err(b"binding a /dev node");
            }
        }
        for (target, link) in &p.dev_links {
            libc::symlink(target.as_ptr(), link.as_ptr());
        }
        if libc::mkdir(p.dev_shm.as_ptr(), 0o755) != 0 || libc::chmod(p.dev_shm.as_ptr(), 0o1777) != 0 {
            return Err(b"creating /dev/shm");
        }
    }
    Ok(())
}

/// A `/proc` of the action's PID namespace, with kernel-revealing paths masked and the
/// tunables read-only (`/proc/sys/user` stays writable to this namespace's root only long
/// enough to set its own limits; the command has no capability to write it).
///
/// # Safety
/// Async-signal-safe.
unsafe fn proc(p: &Plan) -> Result<(), &'static [u8]> {
    let gone = || {
        // SAFETY: reading errno.
        unsafe { *libc::__errno_location() == libc::ENOENT }
    };
    // SAFETY: system calls on the plan's NUL-terminated paths.
    unsafe {
        let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        if !mount(Some(c"proc"), &p.proc_dir, Some(c"proc"), flags, None) {
            return Err(b"mounting /proc");
        }
        for path in &p.proc_null {
            if !mount(Some(c"/dev/null"), path, None, libc::MS_BIND, None) && !gone() {
                return Err(b"masking a /proc file");
            }
        }
        for path in &p.proc_empty {
            if !mount(Some(c"tmpfs"), path, Some(c"tmpfs"), flags | libc::MS_RDONLY, Some(c"size=0")) && !gone() {
                return Err(b"masking a /proc folder");
            }
        }
        for path in &p.proc_ro {
            if !mount(Some(path), path, None, libc::MS_BIND | libc::MS_REC, None) {
                if gone() {
                    continue;
                }
                return Err(b"binding a /proc path");
            }
            if !sys::make_read_only(path, 0x8) {
                return Err(b"making a /proc path read-only");
            }
        }
        let rw = libc::MS_BIND | libc::MS_REMOUNT | flags;
        if !mount(Some(&p.proc_sys_user), &p.proc_sys_user, None, libc::MS_BIND, None)
            || !mount(None, &p.proc_sys_user, None, rw, None)
        {
            return Err(b"binding /proc/sys/user");
        }
    }
    Ok(())
}

/// Brings up `lo` in the action's own network namespace (tests that listen on 127.0.0.1
/// work; nothing leaves the namespace).
///
/// # Safety
/// Async-signal-safe.
unsafe fn loopback_up() {
    // SAFETY: a socket and one ioctl on a zeroed, correctly sized ifreq.
    unsafe {
        let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if s < 0 {
            return;
        }
        let mut ifr: libc::ifreq = std::mem::zeroed();
        ifr.ifr_name[0] = b'l' as libc::c_char;
        ifr.ifr_name[1] = b'o' as libc::c_char;
        ifr.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_LOOPBACK | libc::IFF_RUNNING) as libc::c_short;
        libc::ioctl(s, libc::SIOCSIFFLAGS, &ifr);
        libc::close(s);
    }
}
