//! Real mounts: how files are opened (`auto`: passthrough for large files until small ones
//! dominate, then no-open) and where large blobs live (memory first, the disk cache after).

use std::path::Path;

use casfs::digest::Digest;

use crate::common::*;
use crate::mount::{http_get, walk_files, MountProcess};

/// Small files in the test tree: more than `auto` answers opens for.
const SMALL_FILES: usize = casfs::fs::NO_OPEN_AFTER as usize + 200;
/// A file above the passthrough threshold.
const LARGE_LEN: usize = 3 << 20;

/// The open mode the mount settled on when the kernel answered its FUSE_INIT, from the
/// `casfs_fuse_open_mode{mode="..."}` metric.
fn open_mode(text: &str) -> TestResult<String> {
    let modes: Vec<&str> =
        text.lines().filter_map(|l| l.strip_prefix("casfs_fuse_open_mode{mode=\"")?.strip_suffix("\"} 1")).collect();
    match modes.as_slice() {
        [one] => Ok(one.to_string()),
        _ => Err(format!("not one casfs_fuse_open_mode metric: {modes:?}\n{text}").into()),
    }
}

/// Why this kernel cannot pass files through to a FUSE daemon, if it cannot: the kernel was
/// built without CONFIG_FUSE_PASSTHROUGH (no `fuse_passthrough_open` symbol; /dev/fuse was
/// opened first, so a modular fuse is loaded), or we are not root (backing files need
/// CAP_SYS_ADMIN).
fn passthrough_unavailable() -> Option<String> {
    if let Some(why) = fuse_unavailable() {
        return Some(why);
    }
    match std::fs::read_to_string("/proc/kallsyms") {
        Ok(syms) if syms.lines().any(|l| l.ends_with(" fuse_passthrough_open")) => None,
        Ok(_) => Some("the kernel has no FUSE passthrough (CONFIG_FUSE_PASSTHROUGH)".into()),
        Err(e) => Some(format!("cannot read /proc/kallsyms to learn whether the kernel has FUSE passthrough: {e}")),
    }
}

/// Skips the test (see `skip!`) where the kernel offers no FUSE passthrough.
macro_rules! require_passthrough {
    () => {
        if let Some(why) = passthrough_unavailable() {
            skip!("{why}");
        }
    };
}

fn small_content(i: usize) -> String {
    format!("small file {i:05}\n")
}

/// A tree with one large file and `SMALL_FILES` small ones, uploaded to `server`.
fn upload_tree(dir: &Path, server: &ServeProcess) -> TestResult<(String, Vec<u8>)> {
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("small"))?;
    let large = pseudo_random(7, LARGE_LEN);
    std::fs::write(src.join("large.bin"), &large)?;
    for i in 0..SMALL_FILES {
        std::fs::write(src.join(format!("small/f{i:05}")), small_content(i))?;
    }
    let (code, out, err) = casfs(&["upload", src.to_str().ok_or("path")?, "--remote", &server.url])?;
    assert_eq!(code, 0, "{err}");
    Ok((out.trim().to_string(), large))
}

fn read_small_files(mnt: &Path) -> TestResult {
    for i in 0..SMALL_FILES {
        let got = std::fs::read_to_string(mnt.join(format!("small/f{i:05}")))?;
        assert_eq!(got, small_content(i), "small/f{i:05}");
    }
    Ok(())
}

/// The test tree on a server, mounted with `--open-mode MODE` and a metrics listener.
struct Rig {
    m: MountProcess,
    mnt: std::path::PathBuf,
    addr: String,
    large: Vec<u8>,
    _server: ServeProcess,
    _tmp: tempfile::TempDir,
}

/// A rig whose mount, on a kernel with passthrough, resolved `--open-mode MODE` to
/// `resolved` (by its metric); anything else is an error.
fn rig(mode: &str, resolved: &str) -> TestResult<Rig> {
    let tmp = tempfile::tempdir()?;
    let server = ServeProcess::start(&tmp.path().join("storage"))?;
    let (root, large) = upload_tree(tmp.path(), &server)?;
    let mnt = tmp.path().join("mnt");
    let addr = format!("127.0.0.1:{}", free_port()?);
    let extra = ["--metrics-listen", addr.as_str(), "--open-mode", mode];
    let m = MountProcess::start(&root, &mnt, &server.url, &tmp.path().join("cache"), &extra)?;
    let got = open_mode(&http_get(&addr, "/metrics")?)?;
    assert_eq!(got, resolved, "--open-mode {mode} on a kernel with FUSE passthrough:\n{}", m.log_text());
    Ok(Rig { m, mnt, addr, large, _server: server, _tmp: tmp })
}

/// The daemon's counts of what the kernel asked for, from its metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Counts {
    /// Opens the kernel sent (answered or refused).
    opens: u64,
    /// Reads the kernel sent: none for a passed-through file or a page-cache hit.
    reads: u64,
    /// Opens answered with passthrough.
    passthrough: u64,
    /// Times `auto` stopped answering opens (0 or 1).
    stopped: u64,
}

fn counts(addr: &str) -> TestResult<Counts> {
    let text = http_get(addr, "/metrics")?;
    Ok(Counts {
        opens: metric(&text, "casfs_fuse_ops_total{op=\"open\"}")?,
        reads: metric(&text, "casfs_fuse_ops_total{op=\"read\"}")?,
        passthrough: metric(&text, "casfs_fuse_passthrough_opens_total")?,
        stopped: metric(&text, "casfs_fuse_opens_stopped_total")?,
    })
}

#[test]
fn auto_passes_large_files_through_then_stops_answering_opens() -> TestResult {
    require_passthrough!();
    let r = rig("auto", "Auto")?;
    let Rig { m, mnt, addr, large, .. } = &r;
    // The large file first: one open, answered with passthrough; its 3 MiB never reach the
    // daemon as reads.
    assert_eq!(std::fs::read(mnt.join("large.bin"))?, *large);
    let c = counts(addr)?;
    assert_eq!(c, Counts { opens: 1, reads: 0, passthrough: 1, stopped: 0 }, "after the large file");

    // The small files: NO_OPEN_AFTER opens answered (keep-cache), the next one refused, and
    // then the kernel asks no more. Each file is read through the daemon once.
    read_small_files(mnt)?;
    let after_small = counts(addr)?;
    let answered = 1 + casfs::fs::NO_OPEN_AFTER;
    assert_eq!(after_small.opens, answered + 1, "opens: the large one, {answered} small ones, one refused");
    assert_eq!((after_small.passthrough, after_small.stopped), (1, 1), "{after_small:?}");
    assert_eq!(after_small.reads, SMALL_FILES as u64, "one read per small file");
    assert!(m.log_text().contains("no longer answering opens"), "{}", m.log_text());

    // Everything small stays in the page cache (keep-cache, then no-open): reading it all
    // again sends neither opens nor reads.
    read_small_files(mnt)?;
    assert_eq!(counts(addr)?, after_small, "re-reading the small files reached the daemon");

    // The kernel no longer asks: with the page cache dropped, reading everything again sends
    // no open, and the large file still reads right, now through the daemon.
    std::fs::write("/proc/sys/vm/drop_caches", "1")?;
    read_small_files(mnt)?;
    assert_eq!(std::fs::read(mnt.join("large.bin"))?, *large);
    let c = counts(addr)?;
    assert_eq!((c.opens, c.passthrough), (after_small.opens, 1), "opens sent after the switch: {c:?}");
    assert!(c.reads > after_small.reads + SMALL_FILES as u64, "the large file was not read through the daemon: {c:?}");
    let mnt = mnt.clone();
    drop(r);
    assert!(!casfs::fs::mount::is_mounted(&mnt));
    Ok(())
}

#[test]
fn passthrough_mode_passes_only_large_files_through() -> TestResult {
    require_passthrough!();
    let r = rig("passthrough", "Passthrough")?;
    let Rig { mnt, addr, large, .. } = &r;
    // Small files: opened with keep-cache, read through the daemon once, then from the page
    // cache; every open is answered (this mode never stops answering).
    read_small_files(mnt)?;
    let c = counts(addr)?;
    let small = SMALL_FILES as u64;
    assert_eq!(c, Counts { opens: small, reads: small, passthrough: 0, stopped: 0 }, "after the small files");
    read_small_files(mnt)?;
    let c = counts(addr)?;
    assert_eq!(c, Counts { opens: 2 * small, reads: small, passthrough: 0, stopped: 0 }, "small files again");
    // The large file: passed through at every open; no read reaches the daemon.
    for _ in 0..3 {
        assert_eq!(std::fs::read(mnt.join("large.bin"))?, *large);
    }
    let c = counts(addr)?;
    assert_eq!(c, Counts { opens: 2 * small + 3, reads: small, passthrough: 3, stopped: 0 }, "after the large file");
    Ok(())
}

#[test]
fn large_blobs_served_from_memory_reach_the_disk_cache() -> TestResult {
    require_fuse!();
    let tmp = tempfile::tempdir()?;
    let mut server = ServeProcess::start(&tmp.path().join("storage"))?;
    let (root, large) = upload_tree(tmp.path(), &server)?;
    let cache = tmp.path().join("cache");
    let mnt = tmp.path().join("mnt");
    for mode in ["auto", "no-open"] {
        let m = MountProcess::start(&root, &mnt, &server.url, &cache, &["--open-mode", mode])?;
        assert_eq!(std::fs::read(mnt.join("large.bin"))?, large, "{mode}");
        // Unmounting waits for the copy to the disk cache.
        drop(m);
        let hex = Digest::of_bytes(&large).hash_hex();
        let cached = cache.join("cas").join(&hex[..2]).join(&hex);
        assert_eq!(std::fs::read(&cached)?, large, "{mode}: the disk cache holds the blob after unmount");
        std::fs::remove_file(&cached)?;
    }
    // With the server gone, a new mount over the same cache serves what reached it.
    let m = MountProcess::start(&root, &mnt, &server.url, &cache, &[])?;
    assert_eq!(std::fs::read(mnt.join("large.bin"))?, large);
    assert_eq!(std::fs::read_to_string(mnt.join("small/f00007"))?, small_content(7));
    drop(m);
    server.kill();
    let m = MountProcess::start(&root, &mnt, &server.url, &cache, &["--fetch-timeout", "3s", "--retries", "0"])?;
    assert_eq!(std::fs::read(mnt.join("large.bin"))?, large, "served from the disk cache without the server");
    assert_eq!(std::fs::read_to_string(mnt.join("small/f00007"))?, small_content(7));
    drop(m);
    Ok(())
}

#[test]
fn small_blobs_persist_in_packs_and_serve_after_a_restart() -> TestResult {
    require_fuse!();
    let tmp = tempfile::tempdir()?;
    let mut server = ServeProcess::start(&tmp.path().join("storage"))?;
    let (root, _) = upload_tree(tmp.path(), &server)?;
    let cache = tmp.path().join("cache");
    let mnt = tmp.path().join("mnt");
    let m = MountProcess::start(&root, &mnt, &server.url, &cache, &[])?;
    read_small_files(&mnt)?;
    drop(m);
    // The small blobs went into pack files, not one cache file each.
    let packs = walk_files(&cache.join("packs"));
    assert!(packs.iter().any(|p| p.extension().is_some_and(|e| e == "pack")), "no pack files: {packs:?}");
    let blob_files = walk_files(&cache.join("cas"));
    assert!(blob_files.len() < 10, "{} small blobs got files of their own", blob_files.len());
    server.kill();
    let m = MountProcess::start(&root, &mnt, &server.url, &cache, &["--fetch-timeout", "3s", "--retries", "0"])?;
    read_small_files(&mnt)?;
    assert!(!m.log_text().contains("cannot fetch"), "a small file was fetched again:\n{}", m.log_text());
    Ok(())
}
