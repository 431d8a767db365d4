//! The command's view of its root, seen from the host: a bare `argv[0]` is found the way the
//! command's own `execvp` would find it, in the input root and the host folders bound into
//! it, never in host folders the input root shadows with its own.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};

/// Symlinks followed in one lookup before giving up (as the kernel's ELOOP).
const MAX_LINKS: u32 = 40;

/// `argv` with a bare `argv[0]` looked up in the command's `PATH` (entries relative to the
/// working directory `cwd`; `/usr/local/bin:/usr/bin:/bin` when the command has no PATH)
/// inside its view: `root` with `binds` (host folders bound at the same path) over it.
pub(crate) fn resolve_argv0(
    root: &Path,
    binds: &[PathBuf],
    argv: &[String],
    env: &[(String, String)],
    cwd: &str,
) -> Result<Vec<String>> {
    let mut argv = argv.to_vec();
    if argv[0].contains('/') {
        return Ok(argv);
    }
    // Without a PATH of its own the command gets the usual system one for this lookup only
    // (Pants runs a bare `env -0` with no environment at all); its environment is untouched.
    let path = env.iter().find(|(k, _)| k == "PATH").map(|(_, v)| v.as_str()).unwrap_or("/usr/local/bin:/usr/bin:/bin");
    for entry in path.split(':').filter(|e| !e.is_empty()) {
        let dir = if entry.starts_with('/') { PathBuf::from(entry) } else { Path::new(cwd).join(entry) };
        let candidate = dir.join(&argv[0]);
        if executable_in_view(root, binds, &candidate) {
            argv[0] = candidate.to_string_lossy().into_owned();
            return Ok(argv);
        }
    }
    Err(Error::InvalidArgument(format!(
        "{:?} not found in the command's PATH {path:?} (looked up in the input root and the host folders bound into it)",
        argv[0]
    )))
}

/// Whether `path` (absolute, in the command's view) is an executable file there.
fn executable_in_view(root: &Path, binds: &[PathBuf], path: &Path) -> bool {
    let mut todo: VecDeque<OsString> = VecDeque::new();
    push_front(&mut todo, path);
    let mut cur = PathBuf::from("/");
    let mut links = 0;
    while let Some(name) = todo.pop_front() {
        match name.to_str() {
            Some(".") => continue,
            Some("..") => {
                cur.pop();
                continue;
            }
            _ => {}
        }
        cur.push(&name);
        if binds.iter().any(|b| cur.starts_with(b)) {
            // Inside a host folder: the host's own lookup answers (its symlinks resolve on
            // the host, which for the usual tool folders is what the command sees too).
            let rest: PathBuf = todo.iter().collect();
            return is_executable(&cur.join(rest));
        }
        let inside = root.join(cur.strip_prefix("/").unwrap_or(&cur));
        let Ok(meta) = std::fs::symlink_metadata(&inside) else { return false };
        if meta.file_type().is_symlink() {
            links += 1;
            let Ok(target) = std::fs::read_link(&inside) else { return false };
            if links > MAX_LINKS {
                return false;
            }
            cur.pop();
            if target.is_absolute() {
                cur = PathBuf::from("/");
            }
            push_front(&mut todo, &target);
        } else if todo.is_empty() {
            return meta.is_file() && meta.permissions().mode() & 0o111 != 0;
        } else if !meta.is_dir() {
            return false;
        }
    }
    false
}

/// Puts `path`'s components before the rest still to walk.
fn push_front(todo: &mut VecDeque<OsString>, path: &Path) {
    for c in path.components().rev() {
        match c {
            Component::Normal(n) => todo.push_front(n.to_os_string()),
            Component::ParentDir => todo.push_front("..".into()),
            Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
        }
    }
}

fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn exe(p: &Path) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn env(path: &str) -> Vec<(String, String)> {
        vec![("PATH".into(), path.into())]
    }

    #[test]
    fn the_input_roots_own_folders_shadow_the_hosts() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        // A sysroot with an empty usr/bin and its own bin/ls: the host's /usr/bin/ls is not
        // in the command's view, the root's /bin/ls is.
        std::fs::create_dir_all(root.join("usr/bin")).unwrap();
        exe(&root.join("bin/ls"));
        let argv = resolve_argv0(root, &[], &["ls".into()], &env("/usr/bin:/bin"), "").unwrap();
        assert_eq!(argv[0], "/bin/ls");
        // Not there at all: a clear error, not the host's binary.
        let err = resolve_argv0(root, &[], &["cat".into()], &env("/usr/bin:/bin"), "").unwrap_err();
        assert!(err.to_string().contains("not found"), "{err}");
    }

    #[test]
    fn symlinks_resolve_inside_the_root_and_binds_on_the_host() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        // busybox style: /bin/sh -> busybox, /usr/bin -> ../bin, /abs -> /bin (absolute: the
        // root's /bin, not the host's).
        exe(&root.join("bin/busybox"));
        symlink("busybox", root.join("bin/sh")).unwrap();
        std::fs::create_dir_all(root.join("usr")).unwrap();
        symlink("../bin", root.join("usr/bin")).unwrap();
        symlink("/bin", root.join("abs")).unwrap();
        for path in ["/usr/bin", "/abs", "/bin"] {
            let argv = resolve_argv0(root, &[], &["sh".into()], &env(path), "").unwrap();
            assert_eq!(argv[0], format!("{path}/sh"));
        }
        // A loop ends.
        symlink("loop", root.join("loop")).unwrap();
        assert!(resolve_argv0(root, &[], &["sh".into()], &env("/loop"), "").is_err());
        // PATH entries relative to the working directory.
        exe(&root.join("w/tools/t"));
        let argv = resolve_argv0(root, &[], &["t".into()], &env("tools"), "/w").unwrap();
        assert_eq!(argv[0], "/w/tools/t");
        // A bound host folder is looked up on the host (here: /usr/bin/env of the host).
        let t2 = tempfile::tempdir().unwrap();
        let argv = resolve_argv0(t2.path(), &[PathBuf::from("/usr")], &["env".into()], &env("/usr/bin"), "").unwrap();
        assert_eq!(argv[0], "/usr/bin/env");
        // Not bound: the same host file is invisible.
        assert!(resolve_argv0(t2.path(), &[], &["env".into()], &env("/usr/bin"), "").is_err());
    }
}
