//! Storage faults: bit rot in a server's storage and in a mount's cache, and a cache whose
//! disk is full. Corrupt bytes are never served, and what can heal heals.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use casfs::digest::Digest;

use crate::common::*;
use crate::mount::{http_get, MountProcess};

/// Flips one byte in the middle of a file.
fn flip_byte(path: &Path) -> TestResult {
    let mut bytes = std::fs::read(path)?;
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x5a;
    std::fs::write(path, bytes)?;
    Ok(())
}

/// Where a store (server storage or cache) keeps a blob file.
fn blob_file(root: &Path, d: &Digest) -> PathBuf {
    let hex = d.hash_hex();
    root.join("cas").join(&hex[..2]).join(hex)
}

fn upload(src: &Path, url: &str) -> TestResult<(String, String)> {
    let (code, out, err) = casfs(&["upload", src.to_str().ok_or("path")?, "--remote", url])?;
    assert_eq!(code, 0, "upload failed: {err}");
    Ok((out.trim().to_string(), err))
}

fn cat(d: &Digest, url: &str) -> TestResult<(i32, Vec<u8>)> {
    let out = Command::new(casfs_bin()).args(["cat", &d.to_string(), "--remote", url]).output()?;
    Ok((out.status.code().unwrap_or(-1), out.stdout))
}

/// A folder `src` under `dir` with two blobs: one a server reads in batches (40 KiB), one it
/// streams (9 MiB), made from seeds `seed` and `seed + 1`.
fn small_and_large(dir: &Path, seed: u64) -> TestResult<(PathBuf, Vec<u8>, Vec<u8>)> {
    let src = dir.join("src");
    std::fs::create_dir_all(&src)?;
    let (small, large) = (pseudo_random(seed, 40 << 10), pseudo_random(seed + 1, 9 << 20));
    std::fs::write(src.join("small.bin"), &small)?;
    std::fs::write(src.join("large.bin"), &large)?;
    Ok((src, small, large))
}

#[test]
fn a_corrupt_blob_in_server_storage_is_quarantined_and_healed_by_a_reupload() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let (src, small, large) = small_and_large(tmp.path(), 21)?;
    let storage = tmp.path().join("storage");
    let metrics_addr = format!("127.0.0.1:{}", free_port()?);
    let server = ServeProcess::start_with(&storage, "127.0.0.1:0", &["--metrics-listen", &metrics_addr])?;
    upload(&src, &server.url)?;

    for (data, name) in [(&small, "small"), (&large, "large")] {
        let d = Digest::of_bytes(data);
        flip_byte(&blob_file(&storage, &d))?;
        let (code, out) = cat(&d, &server.url)?;
        assert_ne!(code, 0, "the corrupt {name} blob was read");
        assert_ne!(&out, data, "wrong bytes");
        assert!(!blob_file(&storage, &d).exists(), "the corrupt {name} blob stays in place");
        assert!(storage.join("quarantine").join(d.to_path_form()).exists(), "the {name} blob is not set aside");
    }
    let metrics = http_get(&metrics_addr, "/metrics")?;
    assert!(metrics.contains("casfs_storage_quarantined_blobs_total 2"), "{metrics}");

    // FindMissingBlobs reports both missing: the client sends them again, and reads work.
    let (_, err) = upload(&src, &server.url)?;
    assert!(err.contains("uploaded 2 of"), "the re-upload did not heal: {err}");
    for data in [&small, &large] {
        let (code, out) = cat(&Digest::of_bytes(data), &server.url)?;
        assert_eq!(code, 0);
        assert!(out == *data, "healed blob reads wrong");
    }
    Ok(())
}

/// The server's count of reads that skipped hashing a file it had verified.
fn trusted_reads(metrics_addr: &str) -> TestResult<u64> {
    metric(&http_get(metrics_addr, "/metrics")?, "casfs_storage_trusted_reads_total")
}

#[test]
fn a_server_hashes_a_blob_file_once_a_life_unless_it_changes() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let (src, small, large) = small_and_large(tmp.path(), 23)?;
    let storage = tmp.path().join("storage");
    let metrics_addr = format!("127.0.0.1:{}", free_port()?);
    let args = ["--metrics-listen", metrics_addr.as_str()];
    let mut server = ServeProcess::start_with(&storage, "127.0.0.1:0", &args)?;
    upload(&src, &server.url)?;
    // Hashed on the way in: every read of them is trusted.
    for data in [&small, &large, &small, &large] {
        let (code, out) = cat(&Digest::of_bytes(data), &server.url)?;
        assert!(code == 0 && out == *data);
    }
    assert_eq!(trusted_reads(&metrics_addr)?, 4);
    server.kill();

    // A new life hashes each file once more.
    let server = ServeProcess::start_with(&storage, "127.0.0.1:0", &args)?;
    for (round, trusted) in [(1, 0), (2, 2)] {
        for data in [&small, &large] {
            let (code, out) = cat(&Digest::of_bytes(data), &server.url)?;
            assert!(code == 0 && out == *data, "round {round}");
        }
        assert_eq!(trusted_reads(&metrics_addr)?, trusted, "round {round}");
    }
    // A file changed through the file system is hashed again: right bytes pass (and are
    // trusted again), a flipped byte is caught and the file set aside.
    for (data, name) in [(&small, "small"), (&large, "large")] {
        let d = Digest::of_bytes(data);
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(blob_file(&storage, &d), data)?;
        let before = trusted_reads(&metrics_addr)?;
        assert!(cat(&d, &server.url)?.1 == *data);
        assert_eq!(trusted_reads(&metrics_addr)?, before, "the rewritten {name} blob was not hashed");
        assert!(cat(&d, &server.url)?.1 == *data);
        assert_eq!(trusted_reads(&metrics_addr)?, before + 1);
        std::thread::sleep(std::time::Duration::from_millis(20));
        flip_byte(&blob_file(&storage, &d))?;
        let (code, out) = cat(&d, &server.url)?;
        assert!(code != 0 && out != *data, "the corrupt {name} blob was read");
        assert!(storage.join("quarantine").join(d.to_path_form()).exists(), "the {name} blob is not set aside");
    }
    Ok(())
}

#[test]
fn a_flipped_byte_in_a_cached_blob_file_is_never_served() -> TestResult {
    require_fuse!();
    let tmp = tempfile::tempdir()?;
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src)?;
    let big = pseudo_random(31, 3 << 20);
    std::fs::write(src.join("big.bin"), &big)?;
    std::fs::write(src.join("small.txt"), "small\n")?;
    let mut server = ServeProcess::start(&tmp.path().join("storage"))?;
    let (root, _) = upload(&src, &server.url)?;
    let mnt = tmp.path().join("mnt");
    let cache = tmp.path().join("cache");
    let m = MountProcess::start(&root, &mnt, &server.url, &cache, &[])?;
    assert!(std::fs::read(mnt.join("big.bin"))? == big);
    assert_eq!(std::fs::read_to_string(mnt.join("small.txt"))?, "small\n");
    drop(m);
    let cached = blob_file(&cache, &Digest::of_bytes(&big));
    assert!(cached.exists(), "the blob did not reach the cache's blob files");
    flip_byte(&cached)?;

    // With no server, the next daemon gives an error, not the cached wrong bytes.
    let dead = "grpc://127.0.0.1:9";
    let m = MountProcess::start(&root, &mnt, dead, &cache, &["--fetch-timeout", "2s"])?;
    assert_eq!(std::fs::read_to_string(mnt.join("small.txt"))?, "small\n");
    match std::fs::read(mnt.join("big.bin")) {
        Ok(got) => assert!(got == big, "wrong bytes served from a corrupt cache file"),
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}"),
    }
    assert!(m.log_text().contains("corrupt blob deleted"), "{}", m.log_text());
    drop(m);

    // Corrupt again, with the server up: the next daemon fetches it again.
    std::fs::write(&cached, &big)?;
    flip_byte(&cached)?;
    let m = MountProcess::start(&root, &mnt, &server.url, &cache, &[])?;
    assert!(std::fs::read(mnt.join("big.bin"))? == big, "wrong bytes served from a corrupt cache file");
    assert!(std::fs::read(mnt.join("big.bin"))? == big);
    drop(m);
    assert!(std::fs::read(&cached)? == big, "the cache was not healed");
    server.kill();
    Ok(())
}

/// A tmpfs of a given size mounted on a folder of ours, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> TestResult<Self> {
        std::fs::create_dir_all(at)?;
        let st =
            Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(at).status()?;
        if !st.success() {
            return Err(format!("mounting a tmpfs on {} failed", at.display()).into());
        }
        Ok(Tmpfs(at.to_path_buf()))
    }

    /// Bytes in use (open but deleted files included).
    fn used(&self) -> u64 {
        let path = std::ffi::CString::new(self.0.as_os_str().as_encoded_bytes()).unwrap_or_default();
        // SAFETY: statvfs writes into a zeroed struct we own; `path` is NUL-terminated.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
            return 0;
        }
        (st.f_blocks - st.f_bfree) * st.f_frsize
    }

    /// Fills what is left with `name` (appending), until the disk refuses.
    fn fill(&self, name: &str) -> TestResult {
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(self.0.join(name))?;
        let chunk = vec![7u8; 64 << 10];
        loop {
            if let Err(e) = f.write_all(&chunk) {
                assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
                break;
            }
        }
        // Smaller pieces for the last bytes.
        while f.write_all(&[7u8; 512]).is_ok() {}
        Ok(())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount").arg(&self.0).status().is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

#[test]
fn a_cache_on_a_full_disk_keeps_its_bound_serves_right_bytes_and_keeps_its_packs() -> TestResult {
    // (Root, which mounting the tmpfs needs as well.)
    require_fuse!();
    let tmp = tempfile::tempdir()?;
    let src = tmp.path().join("src");
    let mut files = Vec::new();
    for d in 0..8 {
        for f in 0..40 {
            files.push((format!("small/d{d}/f{f}"), pseudo_random(1000 + d * 100 + f, 6 << 10)));
        }
    }
    const BIG: usize = 4 << 20;
    for b in 0..16u64 {
        files.push((format!("big/b{b}.bin"), pseudo_random(5000 + b, BIG)));
    }
    for (name, data) in &files {
        let p = src.join(name);
        std::fs::create_dir_all(p.parent().ok_or("parent")?)?;
        std::fs::write(p, data)?;
    }
    let mut server = ServeProcess::start(&tmp.path().join("storage"))?;
    let (root, _) = upload(&src, &server.url)?;
    let cache = tmp.path().join("cache");
    // Declared before the mounts: unmounted after them, also on failure.
    let disk = Tmpfs::mount(&cache, "64m")?;
    let mnt = tmp.path().join("mnt");
    let bound = ["--cache-size", "48M"];

    // 1. 64 MiB of large files through a 48 MiB cache: usage stays under the bound plus one
    //    blob (plus the one pack being written).
    let m = MountProcess::start(&root, &mnt, &server.url, &cache, &bound)?;
    let mut peak = 0;
    // Later passes read large files from their blob files (held open for reads) while
    // others are evicted.
    for pass in 0..3 {
        for (name, data) in files.iter().filter(|(n, _)| pass == 0 || n.starts_with("big/")) {
            assert!(std::fs::read(mnt.join(name))? == *data, "{name} reads wrong");
            peak = peak.max(disk.used());
        }
    }
    drop(m);
    peak = peak.max(disk.used());
    eprintln!("cache disk peak: {:.1} MiB (bound 48 MiB, one blob 4 MiB)", peak as f64 / (1 << 20) as f64);
    let limit = (48 << 20) + BIG as u64 + (1 << 20);
    assert!(peak <= limit, "the cache used {peak} bytes of its disk (bound 48 MiB + one blob)");

    // 2. The disk fills up under a running daemon: reads still get the right bytes.
    let m = MountProcess::start(&root, &mnt, &server.url, &cache, &bound)?;
    disk.fill("filler")?;
    for (name, data) in files.iter().rev() {
        assert!(std::fs::read(mnt.join(name))? == *data, "{name} reads wrong on a full disk");
    }
    let log = m.log_text();
    drop(m);
    // Warned once (a WARN), not once per refused blob.
    assert_eq!(log.matches("storage is full").count(), 1, "disk full is not warned about once:\n{log}");
    assert!(!log.contains("could not copy a blob"), "{log}");

    // 3. Packs whose writers died before sealing them, on a disk still full: the next
    //    daemon uses them (every Directory and small file comes from them; no server).
    for e in std::fs::read_dir(cache.join("packs"))?.flatten() {
        if e.path().extension().is_some_and(|x| x == "idx") {
            std::fs::remove_file(e.path())?;
        }
    }
    disk.fill("filler")?;
    server.kill();
    let m = MountProcess::start(
        &root,
        &mnt,
        "grpc://127.0.0.1:9",
        &cache,
        &["--cache-size", "48M", "--fetch-timeout", "2s"],
    )?;
    let mut big_ok = 0;
    for (name, data) in &files {
        match std::fs::read(mnt.join(name)) {
            Ok(got) => {
                assert!(got == *data, "{name} reads wrong");
                big_ok += usize::from(name.starts_with("big/"));
            }
            Err(e) if name.starts_with("big/") => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}"),
            Err(e) => panic!("{name} was cached in a pack but cannot be read: {e}\n{}", m.log_text()),
        }
    }
    assert!(big_ok > 0, "no large file was served from the cache");
    drop(m);
    drop(disk);
    Ok(())
}
