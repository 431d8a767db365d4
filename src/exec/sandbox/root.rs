//! Prepares an action's root for any sandbox: mount points for the host tool folders,
//! `/proc`, `/tmp` and `/dev`, and host symlinks such as `/lib -> usr/lib` recreated.
//!
//! The root is the action's own (hostile) input tree, and this runs as host root before
//! any confinement: nothing here follows a symlink of the root, or a host folder would be
//! created or mounted over outside it.

use std::path::{Component, Path, PathBuf};

use crate::error::{IoContext, Result};

/// What a path inside the root is, without following symlinks.
enum Entry {
    Missing,
    Dir,
    Other,
}

fn entry(p: &Path) -> Entry {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => Entry::Dir,
        Ok(_) => Entry::Other,
        Err(_) => Entry::Missing,
    }
}

/// Creates the folders of `rel` below `root` one by one; `false` (and nothing more made)
/// when a component exists as anything but a real folder.
fn mkdirs(root: &Path, rel: &Path) -> Result<bool> {
    let mut p = root.to_path_buf();
    for c in rel.components() {
        let Component::Normal(name) = c else { continue };
        p.push(name);
        match entry(&p) {
            Entry::Dir => {}
            Entry::Other => return Ok(false),
            Entry::Missing => std::fs::create_dir(&p).ctx(|| format!("creating mount point {}", p.display()))?,
        }
    }
    Ok(true)
}

/// Whether every parent folder of `rel` below `root` is a real folder or absent.
fn parents_are_dirs(root: &Path, rel: &Path) -> bool {
    let mut p = root.to_path_buf();
    let parts: Vec<_> = rel.components().filter(|c| matches!(c, Component::Normal(_))).collect();
    for c in parts.iter().take(parts.len().saturating_sub(1)) {
        p.push(c);
        match entry(&p) {
            Entry::Dir => {}
            Entry::Other => return false,
            Entry::Missing => return true,
        }
    }
    true
}

/// Makes the mount points; returns the host folders to bind (the input root's own entries
/// win: a host folder whose path the input already has, as anything, is left out).
pub(super) fn prepare(root: &Path, host_dirs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut binds = Vec::new();
    for d in host_dirs {
        let rel = d.strip_prefix("/").unwrap_or(d);
        let inside = root.join(rel);
        if !parents_are_dirs(root, rel) || !matches!(entry(&inside), Entry::Missing) {
            tracing::debug!(dir = %d.display(), "the input root has its own; not binding the host's");
            continue;
        }
        match std::fs::symlink_metadata(d) {
            Ok(m) if m.file_type().is_symlink() => {
                let target = std::fs::read_link(d).ctx(|| format!("readlink {}", d.display()))?;
                if let Some(parent) = rel.parent() {
                    if !mkdirs(root, parent)? {
                        continue;
                    }
                }
                std::os::unix::fs::symlink(&target, &inside).ctx(|| format!("linking {}", inside.display()))?;
            }
            Ok(m) if m.is_dir() && mkdirs(root, rel)? => binds.push(d.clone()),
            _ => {}
        }
    }
    // The sandbox's own mount points replace whatever the input has there that is not a
    // folder (a symlink would lead the mount out of the root).
    for name in ["proc", "tmp", "dev"] {
        let p = root.join(name);
        if let Entry::Other = entry(&p) {
            std::fs::remove_file(&p).ctx(|| format!("replacing {}", p.display()))?;
        }
        mkdirs(root, Path::new(name))?;
    }
    Ok(binds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlinks_of_the_root_are_never_followed() -> Result<()> {
        let t = tempfile::tempdir().ctx(|| "tempdir".into())?;
        let (root, host) = (t.path().join("root"), t.path().join("host"));
        std::fs::create_dir_all(&root).ctx(|| "root".into())?;
        std::fs::create_dir_all(host.join("tools")).ctx(|| "host".into())?;
        // The input root points `opt` and `tmp` at host folders.
        std::os::unix::fs::symlink(&host, root.join("opt")).ctx(|| "link".into())?;
        std::os::unix::fs::symlink(&host, root.join("tmp")).ctx(|| "link".into())?;
        let binds = prepare(&root, &[PathBuf::from("/opt/tools/sub"), PathBuf::from("/usr")])?;
        assert!(!host.join("tools/sub").exists(), "created a folder through the root's symlink");
        assert_eq!(binds, vec![PathBuf::from("/usr")]);
        assert!(root.join("usr").is_dir());
        assert!(std::fs::symlink_metadata(root.join("tmp")).map(|m| m.is_dir()).unwrap_or(false));
        assert!(root.join("proc").is_dir() && root.join("dev").is_dir());
        assert!(host.is_dir(), "the symlink's target survived");
        Ok(())
    }
}
