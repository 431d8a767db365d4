//! The command line with `--digest-function`: upload, download, digest, a real FUSE mount of
//! a tree hashed with each function, and BLAKE3 actions through `casfs serve` and `casfs run`.

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

/// Runs `casfs execute` with BLAKE3 against `url`; the ActionResult as JSON.
fn execute_blake3(url: &str, input: &Path, extra: &[&str], script: &str) -> TestResult<serde_json::Value> {
    let mut args = vec!["execute", "--json", "--remote", url, "--digest-function", "blake3", "--input", path(input)?];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--output-dir", "out", "--", "/bin/sh", "-c", script]);
    let (code, out, err) = casfs(&args)?;
    assert_eq!(code, 0, "{err}");
    Ok(serde_json::from_str(&out)?)
}

fn field(v: &serde_json::Value, key: &str) -> TestResult<Digest> {
    let text = v[key].as_str().ok_or_else(|| format!("no {key} in {v}"))?;
    Ok(Digest::parse_with(DigestFunction::Blake3, text)?)
}

/// An Action hashed with BLAKE3 runs on a real `casfs serve`: its outputs, stdout and output
/// Directories are BLAKE3 digests, readable under BLAKE3; DIRECTORY_ONLY gives no Tree.
#[test]
fn blake3_action_through_serve_hashes_outputs_with_blake3() -> TestResult {
    require_fuse!();
    let tmp = tempfile::tempdir()?;
    let server = ServeProcess::start(&tmp.path().join("storage"))?;
    let input = tmp.path().join("in");
    std::fs::create_dir_all(&input)?;
    std::fs::write(input.join("data"), b"input bytes\n")?;
    let script = "mkdir -p out/sub && cat data > out/sub/copy && echo made";
    let r = execute_blake3(&server.url, &input, &[], script)?;
    let stdout = field(&r, "stdout_digest")?;
    assert_eq!(stdout, Digest::of_bytes_with(DigestFunction::Blake3, b"made\n"));
    let dir = &r["output_directories"][0];
    let root = field(dir, "root_directory_digest")?;
    field(dir, "tree_digest")?;
    let dest = tmp.path().join("out");
    let args = ["download", &root.to_string(), path(&dest)?, "--remote", &server.url, "--digest-function", "blake3"];
    let (code, _, err) = casfs(&args)?;
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::read(dest.join("sub/copy"))?, b"input bytes\n");

    let r = execute_blake3(&server.url, &input, &["--output-directory-format", "directory-only"], script)?;
    let dir = &r["output_directories"][0];
    assert!(dir["tree_digest"].is_null(), "DIRECTORY_ONLY still gave a Tree: {dir}");
    assert_eq!(field(dir, "root_directory_digest")?, root);
    Ok(())
}

/// `casfs run` executes a BLAKE3 Action locally and hashes its outputs with BLAKE3.
#[test]
fn blake3_action_through_casfs_run() -> TestResult {
    require_fuse!();
    let tmp = tempfile::tempdir()?;
    let server = ServeProcess::start(&tmp.path().join("storage"))?;
    let input = tmp.path().join("in");
    std::fs::create_dir_all(&input)?;
    let (code, action, err) = casfs(&[
        "action",
        "--remote",
        &server.url,
        "--digest-function",
        "blake3",
        "--input",
        path(&input)?,
        "--output-file",
        "f",
        "--",
        "/bin/sh",
        "-c",
        "echo output > f",
    ])?;
    assert_eq!(code, 0, "{err}");
    let (work, cache) = (tmp.path().join("work"), tmp.path().join("cache"));
    let args = [
        "run",
        action.trim(),
        "--remote",
        &server.url,
        "--digest-function",
        "blake3",
        "--work-dir",
        path(&work)?,
        "--cache-dir",
        path(&cache)?,
    ];
    let (code, out, err) = casfs(&args)?;
    assert_eq!(code, 0, "{err}");
    let want = Digest::of_bytes_with(DigestFunction::Blake3, b"output\n").to_string();
    assert!(out.contains(&want), "no BLAKE3 output digest {want} in {out}");
    Ok(())
}

/// The browse mount shows `blobs/<function>/` for every function; a BLAKE3 tree opens under
/// blake3 and its hash is absent under sha256.
#[test]
fn browse_shows_each_function() -> TestResult {
    require_fuse!();
    let tmp = tempfile::tempdir()?;
    let server = ServeProcess::start(&tmp.path().join("storage"))?;
    let src = tmp.path().join("src");
    generate_tree(&src, &TreeSpec { files: 30, dirs: 4, large: vec![] })?;
    let mnt = tmp.path().join("mnt");
    let _m = MountProcess::start("--browse", &mnt, &server.url, &tmp.path().join("cache"), &[])?;
    let mut listed: Vec<String> = std::fs::read_dir(mnt.join("_/blobs"))?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<_>>()?;
    listed.sort();
    let mut want: Vec<&str> = DigestFunction::ALL.iter().map(|f| f.name()).collect();
    want.sort();
    assert_eq!(listed, want);
    for f in [DigestFunction::Blake3, DigestFunction::Md5] {
        let (code, root, err) =
            casfs(&["upload", path(&src)?, "--remote", &server.url, "--digest-function", f.name()])?;
        assert_eq!(code, 0, "{err}");
        let root = Digest::parse_with(f, root.trim())?;
        same_tree(&src, &mnt.join(format!("_/blobs/{f}/directory")).join(root.to_path_form()))?;
        if f == DigestFunction::Blake3 {
            let as_sha = mnt.join("_/blobs/sha256/directory").join(root.to_path_form());
            assert!(std::fs::metadata(&as_sha).is_err(), "a BLAKE3 root opened as SHA-256");
        }
    }
    // A BLAKE3 action's cached result, with its outputs, under actions/blake3.
    let args = ["execute", "--remote", &server.url, "--digest-function", "blake3", "--input", path(&src)?];
    let tail = ["--output-file", "o", "--", "/bin/sh", "-c", "echo browsed > o; echo out"];
    let (code, _, err) = casfs(&[&args[..], &tail[..]].concat())?;
    assert_eq!(code, 0, "{err}");
    let line = err.lines().find_map(|l| l.strip_prefix("casfs: action ")).ok_or("no action line")?;
    let action = Digest::parse_with(DigestFunction::Blake3, line.trim())?;
    let view = mnt.join("_/actions/blake3").join(action.to_path_form());
    assert_eq!(std::fs::read_to_string(view.join("stdout"))?, "out\n");
    assert_eq!(std::fs::read_to_string(view.join("outputs/o"))?, "browsed\n");
    assert!(std::fs::read_to_string(view.join("command.json"))?.contains("browsed"));
    Ok(())
}
