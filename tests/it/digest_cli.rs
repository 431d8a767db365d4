//! The command line with `--digest-function`: upload, download, digest, a real FUSE mount of
//! a tree hashed with each function.

use std::path::Path;
use std::process::Command;

use casfs::digest::{Digest, DigestFunction};
use casfs::tree::build_local_tree_with;

use crate::common::*;
use crate::mount::MountProcess;

fn path(p: &Path) -> TestResult<&str> {
    Ok(p.to_str().ok_or("non-UTF-8 path")?)
}

fn same_tree(a: &Path, b: &Path) -> TestResult {
    let out = Command::new("diff").arg("-r").arg("--no-dereference").arg(a).arg(b).output()?;
    assert!(out.status.success(), "trees differ: {}", String::from_utf8_lossy(&out.stdout));
    Ok(())
}

/// `casfs upload`, `download` and `digest` under each function: the root is the tree's digest
/// under that function, and the download is the same tree.
#[test]
fn upload_download_and_digest_with_every_function() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let server = ServeProcess::start(&tmp.path().join("storage"))?;
    let src = tmp.path().join("src");
    generate_tree(&src, &TreeSpec { files: 40, dirs: 6, large: vec![2 << 20] })?;
    for f in DigestFunction::ALL {
        let (code, out, err) = casfs(&["upload", path(&src)?, "--remote", &server.url, "--digest-function", f.name()])?;
        assert_eq!(code, 0, "{f}: {err}");
        let want = build_local_tree_with(f, &src, &|_| {})?.root;
        assert_eq!(out.trim(), want.to_string(), "{f}");
        let dest = tmp.path().join(format!("down-{f}"));
        let args = ["download", out.trim(), path(&dest)?, "--remote", &server.url, "--digest-function", f.name()];
        let (code, _, err) = casfs(&args)?;
        assert_eq!(code, 0, "{f}: {err}");
        same_tree(&src, &dest)?;
        let file = tmp.path().join("one");
        std::fs::write(&file, b"hello\n")?;
        let (code, out, err) = casfs(&["digest", "--digest-function", f.name(), path(&file)?])?;
        assert_eq!(code, 0, "{err}");
        assert!(out.starts_with(&Digest::of_bytes_with(f, b"hello\n").to_string()), "{f}: {out}");
    }
    // BLAKE3 must be named: its 64-character root read as SHA-256 is not there.
    let b3 = build_local_tree_with(DigestFunction::Blake3, &src, &|_| {})?.root.to_string();
    let (code, _, _) = casfs(&["ls", &b3, "--remote", &server.url])?;
    assert_ne!(code, 0, "a BLAKE3 root was found as SHA-256");
    let (code, out, err) = casfs(&["ls", &b3, "--remote", &server.url, "--digest-function", "blake3"])?;
    assert_eq!(code, 0, "{err}");
    assert!(!out.is_empty());
    let (code, _, err) = casfs(&["upload", path(&src)?, "--remote", &server.url, "--digest-function", "vso"])?;
    assert_eq!(code, 2, "an unknown function is a usage error: {err}");
    assert!(err.contains("blake3"), "{err}");
    Ok(())
}

/// A real FUSE mount of a tree hashed with each function shows the same files.
#[test]
fn mount_a_tree_hashed_with_each_function() -> TestResult {
    require_fuse!();
    let tmp = tempfile::tempdir()?;
    let server = ServeProcess::start(&tmp.path().join("storage"))?;
    let src = tmp.path().join("src");
    generate_tree(&src, &TreeSpec { files: 40, dirs: 6, large: vec![3 << 20] })?;
    for f in DigestFunction::ALL {
        let (code, root, err) =
            casfs(&["upload", path(&src)?, "--remote", &server.url, "--digest-function", f.name()])?;
        assert_eq!(code, 0, "{f}: {err}");
        let mnt = tmp.path().join(format!("mnt-{f}"));
        let cache = tmp.path().join(format!("cache-{f}"));
        let m = MountProcess::start(root.trim(), &mnt, &server.url, &cache, &["--digest-function", f.name()])?;
        same_tree(&src, &mnt)?;
        drop(m);
    }
    Ok(())
}
