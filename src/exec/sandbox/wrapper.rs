//! `--sandbox-wrapper CMD`: a site's own runner confines the command. casfs starts the
//! wrapper in the action's cgroups (memory, pids and CPU limits apply to it and all it
//! starts; whatever is left when it exits, or at the timeout, is killed) and leaves the rest
//! to it. What the wrapper gets:
//!
//! - argv: the words of CMD (split on whitespace), then the command's argv (argv[0] already
//!   resolved to an absolute path inside the root, or as given when it has a slash);
//! - environment: the Command's environment, plus (overriding any of the same name)
//!   `CASFS_SANDBOX_ROOT` (host path of the input root, to become `/`),
//!   `CASFS_SANDBOX_CWD` (working directory inside the root, absolute),
//!   `CASFS_SANDBOX_UID` / `CASFS_SANDBOX_GID` (host ids to run the command as; they own the
//!   root's folders), `CASFS_SANDBOX_RUN_AS_ROOT` (1: uid 0 inside a user namespace mapped to
//!   those ids), `CASFS_SANDBOX_NETWORK` (0: no network), `CASFS_SANDBOX_TMP_SIZE` (bytes of
//!   `/tmp`) and `CASFS_SANDBOX_HOST_DIRS` (host folders to bind read-only at the same path,
//!   separated by `:`; their mount points, and `proc`, `tmp`, `dev`, exist in the root);
//! - working directory: the host path of the root joined with the working directory;
//! - stdin /dev/null, stdout and stderr the action's files, a session of its own;
//! - it runs as the executor's user (root) with the executor's capabilities: it must drop
//!   them itself. Its exit code is the action's.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use super::sys;
use super::{Launch, Sandbox};
use crate::error::{Error, Result};

/// A site's runner, as its words.
pub struct Wrapper(pub Vec<String>);

/// The variables the wrapper gets on top of the Command's environment.
fn sandbox_env(l: &Launch<'_>) -> Vec<(String, String)> {
    let dirs: Vec<String> = l.host_dirs.iter().map(|d| d.to_string_lossy().into_owned()).collect();
    let flag = |b: bool| if b { "1" } else { "0" }.to_string();
    [
        ("ROOT", l.job.root.to_string_lossy().into_owned()),
        ("CWD", l.job.cwd.clone()),
        ("UID", l.host_ids.0.to_string()),
        ("GID", l.host_ids.1.to_string()),
        ("RUN_AS_ROOT", flag(l.job.run_as_root)),
        ("NETWORK", flag(l.job.network)),
        ("TMP_SIZE", l.tmp_size.to_string()),
        ("HOST_DIRS", dirs.join(":")),
    ]
    .into_iter()
    .map(|(k, v)| (format!("CASFS_SANDBOX_{k}"), v))
    .collect()
}

impl Sandbox for Wrapper {
    fn name(&self) -> &'static str {
        "wrapper"
    }

    fn start(&self, l: &Launch<'_>) -> Result<i32> {
        let Some((program, words)) = self.0.split_first() else {
            return Err(Error::InvalidArgument("--sandbox-wrapper is empty".into()));
        };
        let (stdin, stdout, stderr) = super::stdio(l.job)?;
        let mut cmd = Command::new(program);
        cmd.args(words)
            .args(&l.argv)
            .env_clear()
            .envs(l.job.env.iter().map(|(k, v)| (k, v)))
            .envs(sandbox_env(l))
            .current_dir(l.job.root.join(l.job.cwd.trim_start_matches('/')))
            .stdin(Stdio::from(stdin))
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(stderr));
        let procs = l.cgroup_procs.clone();
        // SAFETY: the closure runs in the forked child before exec and makes only system
        // calls on descriptors prepared here.
        unsafe {
            cmd.pre_exec(move || {
                if !sys::join_cgroups(&procs) {
                    return Err(std::io::Error::last_os_error());
                }
                libc::setsid();
                sys::close_inherited_fds();
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| Error::io(format!("starting the sandbox wrapper {program}"), e))?;
        Ok(child.id() as i32)
    }
}
