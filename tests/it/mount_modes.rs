//! Real mounts: how files are opened (`auto`: passthrough for large files until small ones
//! dominate, then no-open) and where large blobs live (memory first, the disk cache after).

use std::path::Path;

use casfs::digest::Digest;

use crate::common::*;
use crate::mount::{http_get, walk_files, MountProcess};

/// Small files in the test tree: more than `auto` answers opens for.
const SMALL_FILES: usize = casfs::fs::fuse::NO_OPEN_AFTER as usize + 200;
/// A file above the passthrough threshold.
const LARGE_LEN: usize = 3 << 20;

/// The value of an unlabelled or fully labelled metric line, 0 when absent.
fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or(0)
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

/// A rig, or None (having said why) when the kernel left the mount in another mode than
/// `resolved` (no FUSE passthrough).
fn rig(mode: &str, resolved: &str) -> TestResult<Option<Rig>> {
    let tmp = tempfile::tempdir()?;
    let server = ServeProcess::start(&tmp.path().join("storage"))?;
    let (root, large) = upload_tree(tmp.path(), &server)?;
    let mnt = tmp.path().join("mnt");
    let addr = format!("127.0.0.1:{}", free_port()?);
    let extra = ["--metrics-listen", addr.as_str(), "--open-mode", mode];
    let m = MountProcess::start(&root, &mnt, &server.url, &tmp.path().join("cache"), &extra)?;
    if !m.log_text().contains(&format!("mode={resolved}")) {
        eprintln!("skipped: the kernel offers no FUSE passthrough (the mount resolved to another mode)");
        return Ok(None);
    }
    Ok(Some(Rig { m, mnt, addr, large, _server: server, _tmp: tmp }))
}

#[test]
fn auto_passes_large_files_through_then_stops_answering_opens() -> TestResult {
    require_fuse!();
    let Some(r) = rig("auto", "Auto")? else { return Ok(()) };
    let Rig { m, mnt, addr, large, .. } = &r;
    assert_eq!(std::fs::read(mnt.join("large.bin"))?, *large);
    let text = http_get(addr, "/metrics")?;
    assert_eq!(metric(&text, "casfs_fuse_passthrough_opens_total"), 1, "{text}");
    assert_eq!(metric(&text, "casfs_fuse_opens_stopped_total"), 0, "stopped before small files were read");

    read_small_files(mnt)?;
    let text = http_get(addr, "/metrics")?;
    assert_eq!(metric(&text, "casfs_fuse_opens_stopped_total"), 1, "{text}");
    let opens = metric(&text, "casfs_fuse_ops_total{op=\"open\"}");
    // 1 large + NO_OPEN_AFTER small answered + the first one refused.
    assert!(opens <= casfs::fs::fuse::NO_OPEN_AFTER + 2, "{opens} opens answered");
    assert!(m.log_text().contains("no longer answering opens"), "{}", m.log_text());

    // The kernel no longer asks: reading everything again (new files too) sends no open,
    // and the large file still reads right, now through the daemon and the page cache.
    std::fs::write("/proc/sys/vm/drop_caches", "1")?;
    read_small_files(mnt)?;
    assert_eq!(std::fs::read(mnt.join("large.bin"))?, *large);
    let text = http_get(addr, "/metrics")?;
    assert_eq!(metric(&text, "casfs_fuse_ops_total{op=\"open\"}"), opens, "opens sent after the switch");
    assert_eq!(metric(&text, "casfs_fuse_passthrough_opens_total"), 1);
    let mnt = mnt.clone();
    drop(r);
    assert!(!casfs::fs::mount::is_mounted(&mnt));
    Ok(())
}

#[test]
fn passthrough_mode_passes_only_large_files_through() -> TestResult {
    require_fuse!();
    let Some(r) = rig("passthrough", "Passthrough")? else { return Ok(()) };
    let Rig { mnt, addr, large, .. } = &r;
    read_small_files(mnt)?;
    for _ in 0..3 {
        assert_eq!(std::fs::read(mnt.join("large.bin"))?, *large);
    }
    let text = http_get(addr, "/metrics")?;
    assert_eq!(metric(&text, "casfs_fuse_passthrough_opens_total"), 3, "{text}");
    assert_eq!(metric(&text, "casfs_fuse_opens_stopped_total"), 0, "passthrough mode never stops answering");
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
