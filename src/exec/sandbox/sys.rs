//! System-call steps the sandboxes' child processes take between fork and exec, where only
//! async-signal-safe calls are allowed: no allocation, no locks, nothing but system calls;
//! and the executor's side of the pipe such a child reports through.

use std::ffi::CStr;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// Formats `n` in decimal into `buf`; returns the digits.
fn itoa(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

/// Writes `casfs: sandbox: WHAT failed (errno N)` to stderr and returns 127 (the exit code
/// a shell uses when it cannot run a command).
///
/// # Safety
/// Async-signal-safe: call it in a child between fork and exec.
pub(super) unsafe fn fail(what: &[u8]) -> libc::c_int {
    // SAFETY: as this function's.
    unsafe { fail_to(&[2], what) }
}

/// [`fail`], writing the message to each of `fds`.
///
/// # Safety
/// Async-signal-safe: call it in a child between fork and exec.
pub(super) unsafe fn fail_to(fds: &[libc::c_int], what: &[u8]) -> libc::c_int {
    // SAFETY: reading this thread's errno location is always valid.
    let errno = unsafe { *libc::__errno_location() };
    let mut msg = [0u8; 200];
    let mut n = 0;
    let mut digits = [0u8; 20];
    let num = itoa(errno.unsigned_abs() as u64, &mut digits);
    for part in [b"casfs: sandbox: ".as_slice(), what, b" failed (errno ", num, b")\n"] {
        for &c in part {
            if n < msg.len() {
                msg[n] = c;
                n += 1;
            }
        }
    }
    for &fd in fds {
        // SAFETY: `msg[..n]` is initialised memory we own; write(2) only reads it.
        unsafe { libc::write(fd, msg.as_ptr().cast(), n) };
    }
    127
}

/// Moves the calling process into the action's cgroups (writing `0` means "myself").
///
/// # Safety
/// Async-signal-safe; `fds` are open `cgroup.procs` files.
pub(super) unsafe fn join_cgroups(fds: &[RawFd]) -> bool {
    // SAFETY: write(2) of one byte from a static buffer to descriptors we were handed.
    fds.iter().all(|&fd| unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) } == 1)
}

/// Restores default dispositions for the classic signals (exec resets caught ones, but one
/// the executor ignores, SIGPIPE first of all, would stay ignored) and unblocks all signals.
///
/// # Safety
/// Async-signal-safe.
pub(super) unsafe fn reset_signals() {
    for sig in 1..32 {
        if sig != libc::SIGKILL && sig != libc::SIGSTOP {
            // SAFETY: sets a default disposition; no handler code is involved.
            unsafe { libc::signal(sig, libc::SIG_DFL) };
        }
    }
    // SAFETY: `set` is a local sigset_t initialised by sigemptyset before use.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
}

/// Marks every descriptor from 3 up close-on-exec, so nothing the executor has open (its
/// storage, sockets, /dev/fuse) reaches the command.
///
/// # Safety
/// Async-signal-safe.
pub(super) unsafe fn close_inherited_fds() -> bool {
    // SAFETY: close_range(2) only changes descriptor flags.
    if unsafe { libc::close_range(3, u32::MAX, libc::CLOSE_RANGE_CLOEXEC as libc::c_int) } == 0 {
        return true;
    }
    // Kernels before 5.11: one by one, as far as the limit goes.
    // SAFETY: getrlimit fills a local struct; fcntl on unused numbers fails harmlessly.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        for fd in 3..(lim.rlim_cur.min(1 << 20) as libc::c_int) {
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        }
    }
    true
}

/// Becomes `uid:gid` with no supplementary groups and no way to gain privileges again
/// (`no_new_privs`: set-user-ID files and file capabilities stop working). Returns the
/// step that failed.
///
/// Raw system calls, not glibc's `setresuid` and friends: those make every thread of the
/// process change ids together and wait for them, and a child cloned (not forked) from the
/// multi-threaded executor still believes in its parent's threads, so it would wait on a
/// lock copied locked, forever.
///
/// # Safety
/// Async-signal-safe.
pub(super) unsafe fn become_user(uid: u32, gid: u32) -> Result<(), &'static [u8]> {
    let (uid, gid) = (uid as libc::c_long, gid as libc::c_long);
    // SAFETY: credential system calls with plain integer arguments (and a NULL list).
    unsafe {
        if libc::syscall(libc::SYS_setgroups, 0 as libc::c_long, std::ptr::null::<libc::gid_t>()) != 0 {
            return Err(b"setgroups");
        }
        if libc::syscall(libc::SYS_setresgid, gid, gid, gid) != 0 {
            return Err(b"setresgid");
        }
        if libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0 {
            return Err(b"setresuid");
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(b"no_new_privs");
        }
    }
    Ok(())
}

/// Empties the capability bounding and ambient sets of the calling process: nothing it
/// executes can gain a capability, not even as root of its user namespace.
///
/// # Safety
/// Async-signal-safe. Needs CAP_SETPCAP in the current user namespace.
pub(super) unsafe fn drop_bounding_set(last_cap: libc::c_int) -> bool {
    for cap in 0..=last_cap {
        // SAFETY: prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
            return false;
        }
    }
    // SAFETY: as above.
    unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) == 0 }
}

/// The highest capability number this kernel knows.
pub(super) fn last_cap() -> libc::c_int {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(40)
}

/// A pipe whose ends are closed on exec: (read, write).
pub(super) fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the local array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(Error::io("pipe", std::io::Error::last_os_error()));
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// `mount(2)` with an optional source, filesystem type and data.
///
/// # Safety
/// Async-signal-safe.
pub(super) unsafe fn mount(
    src: Option<&CStr>,
    target: &CStr,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
    data: Option<&CStr>,
) -> bool {
    let p = |s: Option<&CStr>| s.map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: every pointer is NULL or a NUL-terminated string that outlives the call.
    unsafe { libc::mount(p(src), target.as_ptr(), p(fstype), flags, p(data).cast()) == 0 }
}

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// Makes the mount at `target` and every mount below it read-only, nosuid and nodev (plus
/// `extra` MOUNT_ATTR_* flags): `mount_setattr(2)`, or a remount of the top one on kernels
/// before 5.12.
///
/// # Safety
/// Async-signal-safe.
pub(super) unsafe fn make_read_only(target: &CStr, extra: u64) -> bool {
    const RDONLY: u64 = 0x1;
    const NOSUID: u64 = 0x2;
    const NODEV: u64 = 0x4;
    let attr = MountAttr { attr_set: RDONLY | NOSUID | NODEV | extra, attr_clr: 0, propagation: 0, userns_fd: 0 };
    // SAFETY: `target` is NUL-terminated and `attr` a live, correctly sized struct.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            target.as_ptr(),
            libc::AT_RECURSIVE as libc::c_uint,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r == 0 {
        return true;
    }
    // SAFETY: reading errno, then a remount with constant flags.
    unsafe {
        if *libc::__errno_location() != libc::ENOSYS {
            return false;
        }
        let mut flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;
        if extra & 0x8 != 0 {
            flags |= libc::MS_NOEXEC;
        }
        mount(None, target, None, flags, None)
    }
}

/// How long the child may take to set the sandbox up (its mount points are looked up in
/// the action's FUSE mount, which may fetch): past it, it is killed and the action fails.
pub(super) const SETUP_TIMEOUT: Duration = Duration::from_secs(120);

/// Reads the child's pipe into `out`: one byte if `one`, else up to end of file (the
/// child's exec). Never past `deadline`, so a child stuck in its setup cannot hold the
/// executor.
pub(super) fn read_pipe(fd: RawFd, one: bool, deadline: Instant, out: &mut Vec<u8>) -> Result<()> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::Internal(format!("the sandbox did not start the command within {SETUP_TIMEOUT:?}")));
        }
        let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: poll(2) on one pollfd we own; read(2) into a local buffer.
        let n = unsafe {
            match libc::poll(&mut pfd, 1, left.as_millis().min(60_000) as libc::c_int) {
                0 => continue,
                r if r < 0 => -1,
                _ => {
                    let mut b = [0u8; 256];
                    let n = libc::read(fd, b.as_mut_ptr().cast(), if one { 1 } else { b.len() });
                    if n > 0 {
                        out.extend_from_slice(&b[..n as usize]);
                    }
                    n
                }
            }
        };
        match n {
            0 => return Ok(()),
            n if n > 0 && (one || out.len() > 4096) => return Ok(()),
            n if n > 0 => {}
            _ if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {}
            _ => return Err(Error::io("reading the sandbox's pipe", std::io::Error::last_os_error())),
        }
    }
}

/// Kills and reaps a child that will not run the command.
pub(super) fn reap_now(pid: i32) {
    // SAFETY: kill(2) and waitpid(2) of our own unreaped child.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, std::ptr::null_mut(), 0);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn itoa_formats_decimal() {
        let mut b = [0u8; 20];
        assert_eq!(super::itoa(0, &mut b), b"0");
        assert_eq!(super::itoa(1234567, &mut b), b"1234567");
        assert_eq!(super::itoa(u64::MAX, &mut b), b"18446744073709551615");
    }
}
