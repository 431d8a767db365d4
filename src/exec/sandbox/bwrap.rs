//! `--sandbox=bwrap`: the command runs through bubblewrap (`bwrap` on the PATH), started as
//! the action's unprivileged host user, so bubblewrap makes the user namespace itself and
//! the command ends up with the same view as in the built-in sandbox: the input root as
//! `/`, host tool folders read-only, its own `/proc`, `/dev` and sized `/tmp`, every
//! namespace new (the network only unless asked for), no capabilities, no nested user
//! namespaces.
//!
//! The input root sits below folders only root may enter (the work folder, often in
//! /root), so before dropping to that user a short step as real root, in a mount namespace
//! of its own, shows the root at `/tmp/casfs-root` (a private tmpfs over `/tmp` of that
//! namespace only) where bubblewrap can reach it.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use super::sys::{self, mount};
use super::{cstr, Launch, Sandbox};
use crate::error::{Error, Result};

/// The bubblewrap sandbox.
pub struct Bwrap;

/// Where bubblewrap finds the root, in the mount namespace it starts in.
const ALIAS: &str = "/tmp/casfs-root";

/// `bwrap` on the executor's PATH.
fn bwrap_path() -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    std::env::split_paths(&path).map(|d| d.join("bwrap")).find(|p| p.is_file()).ok_or_else(|| {
        Error::FailedPrecondition("--sandbox=bwrap: no bwrap on the PATH (Debian package bubblewrap)".into())
    })
}

/// bubblewrap's arguments for `l`.
fn args(l: &Launch<'_>) -> Vec<String> {
    let mut a: Vec<String> = ["--unshare-all", "--unshare-user", "--disable-userns", "--new-session"]
        .into_iter()
        .map(String::from)
        .collect();
    if l.job.network {
        a.push("--share-net".into());
    }
    let (uid, gid) = l.inside_ids;
    a.extend(["--uid".into(), uid.to_string(), "--gid".into(), gid.to_string()]);
    a.extend(["--hostname", "casfs", "--bind", ALIAS, "/"].map(String::from));
    for d in &l.host_dirs {
        let d = d.to_string_lossy().into_owned();
        a.extend(["--ro-bind".into(), d.clone(), d]);
    }
    a.extend(["--proc", "/proc", "--dev", "/dev"].map(String::from));
    a.extend(["--size".into(), l.tmp_size.to_string(), "--tmpfs".into(), "/tmp".into()]);
    a.extend(["--chdir".into(), l.job.cwd.clone(), "--".into()]);
    a.extend(l.argv.iter().cloned());
    a
}

impl Sandbox for Bwrap {
    fn name(&self) -> &'static str {
        "bwrap"
    }

    fn start(&self, l: &Launch<'_>) -> Result<i32> {
        let (stdin, stdout, stderr) = super::stdio(l.job)?;
        let mut cmd = Command::new(bwrap_path()?);
        cmd.args(args(l))
            .env_clear()
            .envs(l.job.env.iter().map(|(k, v)| (k, v)))
            .current_dir("/")
            .stdin(Stdio::from(stdin))
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(stderr));
        let procs = l.cgroup_procs.clone();
        let root = cstr(l.job.root.as_os_str().as_bytes())?;
        let alias = cstr(ALIAS)?;
        let (uid, gid) = l.host_ids;
        let step = |ok: bool, what: &str| -> std::io::Result<()> {
            if ok {
                return Ok(());
            }
            let e = std::io::Error::last_os_error();
            Err(std::io::Error::new(e.kind(), format!("bwrap sandbox: {what}: {e}")))
        };
        // SAFETY: the closure runs in the forked child before exec and makes only system
        // calls on strings and descriptors prepared here (the io::Error built on failure
        // allocates, as std's own pre-exec error path does, and ends the child).
        unsafe {
            cmd.pre_exec(move || {
                step(sys::join_cgroups(&procs), "joining the action's cgroup")?;
                step(libc::unshare(libc::CLONE_NEWNS) == 0, "unshare(mount)")?;
                step(mount(None, c"/", None, libc::MS_REC | libc::MS_PRIVATE, None), "making mounts private")?;
                step(libc::chdir(root.as_ptr()) == 0, "entering the root")?;
                let opts = c"mode=0755,size=16k";
                let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
                step(mount(Some(c"tmpfs"), c"/tmp", Some(c"tmpfs"), flags, Some(opts)), "mounting a private /tmp")?;
                step(libc::mkdir(alias.as_ptr(), 0o755) == 0, "creating the root's mount point")?;
                step(mount(Some(c"."), &alias, None, libc::MS_BIND | libc::MS_REC, None), "binding the root")?;
                step(libc::chdir(c"/".as_ptr()) == 0, "leaving the root")?;
                if let Err(what) = sys::become_user(uid, gid) {
                    let what = std::str::from_utf8(what).unwrap_or("dropping privileges");
                    step(false, what)?;
                }
                sys::close_inherited_fds();
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| Error::io("starting bwrap", e))?;
        Ok(child.id() as i32)
    }
}
