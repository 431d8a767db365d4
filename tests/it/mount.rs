//! Real FUSE mounts against a real `casfs serve`: a 100k-file tree, laziness measured at the
//! server, corruption, a dead server, signals and stale mounts, hostile Directories.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use bytes::Bytes;

use casfs::cas::{Cas, GrpcStore, RemoteConfig};
use casfs::digest::Digest;
use casfs::proto::reapi;
use casfs::tree::{DirEntry, Directory, FileEntry};

use crate::common::*;

/// A `casfs mount` daemon; unmounted (SIGTERM) on drop.
pub struct MountProcess {
    pub pid: i32,
    pub mountpoint: PathBuf,
    pub log: PathBuf,
    pub pidfile: PathBuf,
}

impl MountProcess {
    /// Mounts `digest` at `mountpoint` as a daemon and returns once it is up.
    pub fn start(digest: &str, mountpoint: &Path, url: &str, cache: &Path, extra: &[&str]) -> TestResult<Self> {
        std::fs::create_dir_all(mountpoint)?;
        let dir = cache.parent().ok_or("cache has no parent")?;
        let pidfile = dir.join(format!("mount-{}.pid", rand_suffix()));
        let log = dir.join(format!("mount-{}.log", rand_suffix()));
        let mut cmd = Command::new(casfs_bin());
        cmd.args(["mount", digest])
            .arg(mountpoint)
            .args(["--remote", url, "--cache-dir"])
            .arg(cache)
            .arg("--pidfile")
            .arg(&pidfile)
            .arg("--log-file")
            .arg(&log)
            .args(extra)
            .env("CASFS_LOG", "info");
        let out = cmd.output()?;
        if !out.status.success() {
            return Err(format!("casfs mount failed: {}", String::from_utf8_lossy(&out.stderr)).into());
        }
        let pid: i32 = std::fs::read_to_string(&pidfile)?.trim().parse()?;
        Ok(MountProcess { pid, mountpoint: mountpoint.to_path_buf(), log, pidfile })
    }

    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends a signal and waits (up to 20 s) for the process to exit.
    pub fn signal_and_wait(&self, sig: i32) -> bool {
        signal(self.pid, sig);
        self.wait_exit()
    }

    /// Waits (up to 20 s) for the process to exit; false if it is still there.
    pub fn wait_exit(&self) -> bool {
        for _ in 0..400 {
            if !signal(self.pid, 0) {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        false
    }
}

impl Drop for MountProcess {
    fn drop(&mut self) {
        if !self.signal_and_wait(libc::SIGTERM) {
            self.signal_and_wait(libc::SIGKILL);
        }
        if casfs::fs::mount::is_mounted(&self.mountpoint) {
            let _ = casfs::fs::mount::detach(&self.mountpoint);
        }
    }
}

fn rand_suffix() -> u64 {
    rand::random::<u64>() % 1_000_000_000
}

/// Source-side listing with modes as the mount shows them (0444 / 0555 files).
fn as_mounted(lines: Vec<String>) -> Vec<String> {
    reapi_modes(lines).into_iter().map(|l| l.replace(" f 755 ", " f 555 ").replace(" f 644 ", " f 444 ")).collect()
}

/// Runs `cat` on a path with an outer time limit; returns (exit code, stderr).
fn cat_with_limit(path: &Path, secs: u32) -> TestResult<(i32, String)> {
    let out = Command::new("timeout").arg(secs.to_string()).arg("cat").arg(path).output()?;
    Ok((out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned()))
}

#[test]
fn a_100k_file_tree_mounts_and_diffs_clean() -> TestResult {
    require_fuse!();
    let tmp = tempfile::tempdir()?;
    let src = tmp.path().join("src");
    generate_tree(&src, &TreeSpec { files: 100_000, dirs: 1_200, large: vec![9 << 20] })?;
    let server = ServeProcess::start(&tmp.path().join("storage"))?;
    let (code, out, err) = casfs(&["upload", src.to_str().ok_or("path")?, "--remote", &server.url])?;
    assert_eq!(code, 0, "{err}");
    let mnt = tmp.path().join("mnt");
    let m = MountProcess::start(out.trim(), &mnt, &server.url, &tmp.path().join("cache"), &[])?;
    diff_r(&src, &mnt)?;
    assert_eq!(as_mounted(listing(&src)?), listing(&mnt)?);
    // The daemon reports its live inode count as statfs "files". After the walk the kernel
    // holds ~100k inodes; dropping the kernel's caches sends FORGETs that free them.
    let held = inodes_held(&mnt)?;
    assert!(held > 50_000, "only {held} inodes after a full walk");
    std::fs::write("/proc/sys/vm/drop_caches", "2")?;
    std::thread::sleep(std::time::Duration::from_millis(500));
    let after = inodes_held(&mnt)?;
    eprintln!("inodes held: {held} after the walk, {after} after drop_caches");
    assert!(after < held / 10, "FORGET did not shrink the inode table: {held} -> {after}");
    drop(m);
    assert!(!casfs::fs::mount::is_mounted(&mnt));
    Ok(())
}

pub(crate) fn http_get(addr: &str, path: &str) -> TestResult<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

fn inodes_held(mnt: &Path) -> TestResult<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(mnt.as_os_str().as_bytes())?;
    // SAFETY: statvfs is plain data; all zeroes is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a local the call fills.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(st.f_files)
}

fn access_lines(log: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("read "))
        .map(String::from)
        .collect();
    v.sort();
    v.dedup();
    v
}

#[test]
fn fetches_only_what_is_touched() -> TestResult {
    require_fuse!();
    let tmp = tempfile::tempdir()?;
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("a/b"))?;
    std::fs::create_dir_all(src.join("c"))?;
    for i in 0..20 {
        std::fs::write(src.join(format!("a/b/f{i}")), format!("file {i}\n"))?;
        std::fs::write(src.join(format!("c/g{i}")), format!("other {i}\n"))?;
        std::fs::write(src.join(format!("top{i}")), format!("top {i}\n"))?;
    }
    let tree = casfs::tree::build_local_tree(&src, &|_| {})?;
    let storage = tmp.path().join("storage");
    let server = ServeProcess::start(&storage)?;
    let (code, _, err) = casfs(&["upload", src.to_str().ok_or("path")?, "--remote", &server.url])?;
    assert_eq!(code, 0, "{err}");
    drop(server);
    // Restart with an access log, so only the mount's reads are recorded.
    let log = tmp.path().join("access.log");
    // A server that is killed on drop, even when an assertion fails.
    let server = ServeProcess::start_with(&storage, "127.0.0.1:0", &["--access-log", log.to_str().ok_or("path")?])?;
    let url = server.url.clone();
    let mnt = tmp.path().join("mnt");
    let metrics_addr = format!("127.0.0.1:{}", free_port()?);
    let m = MountProcess::start(
        &tree.root.to_string(),
        &mnt,
        &url,
        &tmp.path().join("cache"),
        // Laziness of plain lookups and reads: no whole-tree prefetch (see tree_reads.rs).
        &["--metrics-listen", &metrics_addr, "--tree-prefetch-bytes", "0", "--scan-ahead", "0"],
    )?;
    assert!(access_lines(&log).is_empty(), "mounting fetched: {:?}", access_lines(&log));

    let ls = Command::new("ls").arg("-l").arg(&mnt).output()?;
    assert!(ls.status.success());
    assert_eq!(access_lines(&log), vec![format!("read {}", tree.root)], "ls of the root");

    let content = std::fs::read(mnt.join("a/b/f7"))?;
    assert_eq!(content, b"file 7\n");
    let root = Directory::decode(&tree.root, &tree.directories[&tree.root])?;
    let a = root.dirs.iter().find(|d| d.name == "a").ok_or("a")?.digest;
    let a_dir = Directory::decode(&a, &tree.directories[&a])?;
    let b = a_dir.dirs[0].digest;
    let f7 = Digest::of_bytes(b"file 7\n");
    let mut want = vec![format!("read {}", tree.root), format!("read {a}"), format!("read {b}"), format!("read {f7}")];
    want.sort();
    assert_eq!(access_lines(&log), want, "reading one file fetched more than its path");
    // The daemon's own counters agree.
    let metrics = http_get(&metrics_addr, "/metrics")?;
    assert!(metrics.contains("casfs_fetch_dirs_total 3"), "{metrics}");
    assert!(metrics.contains("casfs_fetch_blobs_total 1"), "{metrics}");
    assert!(metrics.contains("casfs_fuse_op_seconds_count{op=\"lookup\"}"), "{metrics}");
    drop(m);
    drop(server);
    Ok(())
}

#[test]
fn corrupt_blobs_give_eio_and_never_reach_the_cache() -> TestResult {
    require_fuse!();
    let tmp = tempfile::tempdir()?;
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src)?;
    let small = b"small file that will be corrupted\n".to_vec();
    let large = pseudo_random(3, 6 << 20);
    std::fs::write(src.join("small"), &small)?;
    std::fs::write(src.join("large"), &large)?;
    std::fs::write(src.join("fine"), b"untouched\n")?;
    let storage = tmp.path().join("storage");
    let server = ServeProcess::start(&storage)?;
    let (code, out, err) = casfs(&["upload", src.to_str().ok_or("path")?, "--remote", &server.url])?;
    assert_eq!(code, 0, "{err}");
    let (ds, dl) = (Digest::of_bytes(&small), Digest::of_bytes(&large));
    for (d, len) in [(ds, small.len()), (dl, large.len())] {
        let hex = d.hash_hex();
        let path = storage.join("cas").join(&hex[..2]).join(&hex);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
        std::fs::write(&path, vec![b'X'; len])?;
    }
    let cache = tmp.path().join("cache");
    let mnt = tmp.path().join("mnt");
    // Whole-blob reads: read by its chunks (intact in the server's store), the large file
    // would be assembled and verified correct despite its corrupt whole copy.
    let m = MountProcess::start(out.trim(), &mnt, &server.url, &cache, &[])?;
    for (name, d) in [("small", ds), ("large", dl)] {
        let (code, stderr) = cat_with_limit(&mnt.join(name), 60)?;
        assert_ne!(code, 0, "{name} read despite corruption");
        assert!(stderr.contains("Input/output error"), "{name}: {stderr}");
        assert!(m.log_text().contains(&d.hash_hex()), "no log line names {d}:\n{}", m.log_text());
        let hex = d.hash_hex();
        assert!(!cache.join("cas").join(&hex[..2]).join(&hex).exists(), "corrupt {name} entered the cache");
    }
    assert_eq!(std::fs::read(mnt.join("fine"))?, b"untouched\n");
    let bad: usize = walk_files(&cache)
        .into_iter()
        .filter(|p| std::fs::read(p).map(|b| b.len() > 20 && b.iter().all(|c| *c == b'X')).unwrap_or(false))
        .count();
    assert_eq!(bad, 0, "corrupt bytes found in the local cache");
    Ok(())
}

/// Every file below `p` (none when `p` is absent).
pub(crate) fn walk_files(p: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            if e.path().is_dir() {
                out.extend(walk_files(&e.path()));
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

#[test]
fn dead_server_gives_eio_within_the_deadline_and_recovery_follows() -> TestResult {
    require_fuse!();
    let tmp = tempfile::tempdir()?;
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("d"))?;
    std::fs::write(src.join("early"), b"read before the outage\n")?;
    std::fs::write(src.join("d/late"), b"read after the outage\n")?;
    let storage = tmp.path().join("storage");
    let listen = format!("127.0.0.1:{}", free_port()?);
    let mut server = ServeProcess::start_on(&storage, &listen)?;
    let (code, out, err) = casfs(&["upload", src.to_str().ok_or("path")?, "--remote", &server.url])?;
    assert_eq!(code, 0, "{err}");
    let mnt = tmp.path().join("mnt");
    let m = MountProcess::start(
        out.trim(),
        &mnt,
        &server.url,
        &tmp.path().join("cache"),
        &["--fetch-timeout", "3s", "--retries", "100"],
    )?;
    assert_eq!(std::fs::read(mnt.join("early"))?, b"read before the outage\n");
    server.kill();
    // The fetch deadline is 3 s; `timeout 60` only guards against a hang.
    let (code, stderr) = cat_with_limit(&mnt.join("d/late"), 60)?;
    assert_ne!(code, 124, "reader hung on a dead server");
    assert_ne!(code, 0);
    assert!(stderr.contains("Input/output error"), "{stderr}");
    // Cached content keeps working while the server is down.
    assert_eq!(std::fs::read(mnt.join("early"))?, b"read before the outage\n");
    let _server = ServeProcess::start_on(&storage, &listen)?;
    assert_eq!(std::fs::read(mnt.join("d/late"))?, b"read after the outage\n");
    drop(m);
    Ok(())
}

#[test]
fn sigterm_unmounts_and_sigkill_leftovers_are_cleared() -> TestResult {
    require_fuse!();
    let tmp = tempfile::tempdir()?;
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src)?;
    std::fs::write(src.join("x"), b"x\n")?;
    let server = ServeProcess::start(&tmp.path().join("storage"))?;
    let (_, out, _) = casfs(&["upload", src.to_str().ok_or("path")?, "--remote", &server.url])?;
    let mnt = tmp.path().join("mnt");
    let cache = tmp.path().join("cache");
    let m = MountProcess::start(out.trim(), &mnt, &server.url, &cache, &[])?;
    assert!(casfs::fs::mount::is_mounted(&mnt));
    assert!(m.signal_and_wait(libc::SIGTERM), "daemon ignored SIGTERM");
    assert!(!casfs::fs::mount::is_mounted(&mnt), "SIGTERM left the mount behind");

    let m = MountProcess::start(out.trim(), &mnt, &server.url, &cache, &[])?;
    assert!(m.signal_and_wait(libc::SIGKILL));
    assert!(casfs::fs::mount::is_mounted(&mnt), "expected a stale mount after SIGKILL");
    assert!(std::fs::read(mnt.join("x")).is_err(), "a dead mount answered");
    let m2 = MountProcess::start(out.trim(), &mnt, &server.url, &cache, &[])?;
    assert_eq!(std::fs::read(mnt.join("x"))?, b"x\n");
    drop(m2);
    drop(m);
    assert!(!casfs::fs::mount::is_mounted(&mnt));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_directories_give_eio_and_the_rest_keeps_working() -> TestResult {
    require_fuse!();
    let tmp = tempfile::tempdir()?;
    let server = ServeProcess::start(&tmp.path().join("storage"))?;
    let client = GrpcStore::new(&RemoteConfig::new(&server.url))?;
    let ok_file = Bytes::from_static(b"fine\n");
    let fd = Digest::of_bytes(&ok_file);
    client.write(&fd, ok_file).await?;
    // Children that break the rules: unsorted names, a '..' entry, and bytes that are not a
    // Directory message at all.
    let node = |n: &str| reapi::FileNode { name: n.into(), digest: Some(fd.to_proto()), ..Default::default() };
    let unsorted = reapi::Directory { files: vec![node("b"), node("a")], ..Default::default() };
    let dotdot = reapi::Directory {
        directories: vec![reapi::DirectoryNode { name: "..".into(), digest: Some(fd.to_proto()) }],
        ..Default::default()
    };
    let mut children = Vec::new();
    for bytes in [prost::Message::encode_to_vec(&unsorted), prost::Message::encode_to_vec(&dotdot), vec![0xff; 10]] {
        let d = Digest::of_bytes(&bytes);
        client.write(&d, bytes.into()).await?;
        children.push(d);
    }
    let root = Directory {
        files: vec![FileEntry { name: "good".into(), digest: fd, executable: false }],
        dirs: vec![
            DirEntry { name: "bad1".into(), digest: children[0] },
            DirEntry { name: "bad2".into(), digest: children[1] },
            DirEntry { name: "bad3".into(), digest: children[2] },
        ],
        symlinks: vec![],
    };
    let (rd, rb) = root.encode();
    client.write(&rd, rb.into()).await?;
    let mnt = tmp.path().join("mnt");
    let m = MountProcess::start(&rd.to_string(), &mnt, &server.url, &tmp.path().join("cache"), &[])?;
    for bad in ["bad1", "bad2", "bad3"] {
        let err = std::fs::read_dir(mnt.join(bad)).and_then(|mut r| r.next().transpose()).expect_err(bad);
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{bad}: {err}");
    }
    assert_eq!(std::fs::read(mnt.join("good"))?, b"fine\n");
    assert!(m.log_text().contains("invalid Directory"), "{}", m.log_text());
    assert!(signal(m.pid, 0), "daemon died");
    Ok(())
}
