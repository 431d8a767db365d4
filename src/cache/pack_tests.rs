//! Unit tests of the pack store: records, indexes, eviction, recovery, sharing a folder.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use tempfile::tempdir;

use super::*;
use crate::digest::Digest;

type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

/// `n` pseudo-random bytes, different for every `i`.
fn bytes_for(i: u64, n: usize) -> Bytes {
    crate::cas::pseudo_random(i, n).into()
}

fn blob(i: u64, n: usize) -> (Digest, Bytes) {
    let b = bytes_for(i, n);
    (Digest::of_bytes(&b), b)
}

fn blobs(range: std::ops::Range<u64>, n: usize) -> Vec<(Digest, Bytes)> {
    range.map(|i| blob(i, n)).collect()
}

/// The files in `dir` whose names end in `.{ext}`, sorted.
fn files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = fs::read_dir(dir)
        .expect("listing the store")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .collect();
    out.sort();
    out
}

fn disk_bytes(dir: &Path) -> u64 {
    files(dir, "pack").iter().map(|p| fs::metadata(p).map(|m| m.len()).unwrap_or(0)).sum()
}

fn assert_reads(store: &PackStore, blobs: &[(Digest, Bytes)]) -> TestResult {
    for (d, b) in blobs {
        assert!(store.contains(d), "{d} not contained");
        assert_eq!(store.read(d)?.as_ref(), Some(b), "{d} not read back");
    }
    Ok(())
}

/// One record as a writer lays it out.
fn record(d: &Digest, data: &[u8]) -> Vec<u8> {
    let mut r = RECORD_MAGIC.to_le_bytes().to_vec();
    r.extend_from_slice(&(data.len() as u32).to_le_bytes());
    r.extend_from_slice(d.hash_bytes());
    r.extend_from_slice(data);
    r
}

#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Runs `f` with tracing output captured; returns its result and the log text.
fn with_logs<T>(f: impl FnOnce() -> T) -> (T, String) {
    let logs = Logs::default();
    let sink = logs.clone();
    let sub = tracing_subscriber::fmt().with_writer(move || sink.clone()).with_ansi(false).finish();
    let out = tracing::subscriber::with_default(sub, f);
    let text = String::from_utf8_lossy(&logs.0.lock().expect("log buffer")).into_owned();
    (out, text)
}

#[test]
fn append_read_and_reopen() -> TestResult {
    fn shared<T: Send + Sync>() {}
    shared::<PackStore>();
    assert_eq!(std::mem::size_of::<(Key, Loc)>(), 28, "index entries stay compact");
    let dir = tempdir()?;
    let bs = blobs(0..50, 100);
    {
        let s = PackStore::open(dir.path(), 0)?;
        assert!(s.is_empty());
        s.append_verified(&bs)?;
        assert_eq!(s.len(), 50);
        assert_reads(&s, &bs)?;
        s.append_verified(&bs)?;
        assert_eq!(s.len(), 50, "held blobs are skipped");
        assert_eq!(s.total_bytes(), 50 * (HEADER as u64 + 100));
    }
    assert_eq!(files(dir.path(), "idx").len(), 1, "a dropped store seals its pack");
    let s = PackStore::open(dir.path(), 0)?;
    assert_eq!(s.len(), 50);
    assert_eq!(s.total_bytes(), disk_bytes(dir.path()));
    assert_reads(&s, &bs)
}

#[test]
fn a_live_writers_pack_is_read_but_left_alone() -> TestResult {
    let dir = tempdir()?;
    let (old, new) = (blobs(0..20, 300), blobs(20..30, 300));
    let s = PackStore::open(dir.path(), 0)?;
    s.append_verified(&old)?;
    // A leaked store keeps its pack's lock, like a writer still running in another process.
    std::mem::forget(s);
    let pack = files(dir.path(), "pack").remove(0);
    let len = fs::metadata(&pack)?.len();
    let t = PackStore::open(dir.path(), 0)?;
    assert_reads(&t, &old)?;
    assert!(files(dir.path(), "idx").is_empty(), "a reader does not seal a live writer's pack");
    t.append_verified(&new)?;
    drop(t);
    assert_eq!(fs::metadata(&pack)?.len(), len, "nor truncate it");
    let u = PackStore::open(dir.path(), 0)?;
    assert_reads(&u, &old)?;
    assert_reads(&u, &new)
}

#[test]
fn a_pack_deleted_by_another_store_reads_as_absent() -> TestResult {
    let dir = tempdir()?;
    let (old, new) = (blobs(0..5, 100), blobs(5..10, 100));
    PackStore::open(dir.path(), 0)?.append_verified(&old)?;
    let s = PackStore::open(dir.path(), 0)?;
    s.append_verified(&new)?;
    // As another store's eviction would: the sealed pack and its index go.
    let sealed = files(dir.path(), "idx").remove(0);
    fs::remove_file(sealed.with_extension("pack"))?;
    fs::remove_file(sealed)?;
    assert_eq!(s.read(&old[0].0)?, None);
    assert!(old.iter().all(|(d, _)| !s.contains(d)), "all of the pack's entries are dropped");
    assert_eq!((s.len(), s.total_bytes()), (5, disk_bytes(dir.path())));
    assert_reads(&s, &new)
}

#[test]
fn a_dead_writers_pack_is_recovered_and_sealed() -> TestResult {
    let dir = tempdir()?;
    let bs = blobs(0..3, 64);
    let body: Vec<u8> = bs.iter().flat_map(|(d, b)| record(d, b)).collect();
    fs::write(dir.path().join("0000000007-1-0badc0de.pack"), &body)?;
    let s = PackStore::open(dir.path(), 0)?;
    assert_reads(&s, &bs)?;
    assert!(dir.path().join("0000000007-1-0badc0de.idx").exists(), "recovered pack is sealed");
    s.append_verified(&blobs(3..4, 64))?;
    let names: Vec<_> =
        files(dir.path(), "pack").iter().filter_map(|p| p.file_name()?.to_str().map(String::from)).collect();
    assert!(names[1].starts_with("0000000008-"), "a new pack follows the newest one: {names:?}");
    drop(s);
    let s = PackStore::open(dir.path(), 0)?;
    assert_eq!(s.len(), 4);
    assert_reads(&s, &bs)
}

/// Something done to a pack file on disk.
type Damage = fn(&Path) -> std::io::Result<()>;

#[test]
fn a_torn_tail_is_cut_and_earlier_records_kept() -> TestResult {
    let rec = HEADER as u64 + 1000;
    // (what happens to the tail, length of the pack the reopen must leave)
    let cases: [(&str, Damage, u64); 3] = [
        (
            "cut in the last record's data",
            |p| fs::OpenOptions::new().write(true).open(p)?.set_len(9 * 1040 + 500),
            9 * rec,
        ),
        (
            "cut in the last record's header",
            |p| fs::OpenOptions::new().write(true).open(p)?.set_len(9 * 1040 + 20),
            9 * rec,
        ),
        (
            "garbage after the last record",
            |p| fs::OpenOptions::new().append(true).open(p)?.write_all(b"garbage after the end, longer than a header!"),
            10 * rec,
        ),
    ];
    for (what, damage, kept) in cases {
        let dir = tempdir()?;
        let bs = blobs(0..10, 1000);
        PackStore::open(dir.path(), 0)?.append_verified(&bs)?;
        // As if the writer died before sealing: no index, and a damaged tail.
        fs::remove_file(files(dir.path(), "idx").remove(0))?;
        let pack = files(dir.path(), "pack").remove(0);
        damage(&pack)?;
        let s = PackStore::open(dir.path(), 0)?;
        let n = (kept / rec) as usize;
        assert_eq!(s.len(), n, "{what}");
        assert_reads(&s, &bs[..n])?;
        assert_eq!(fs::metadata(&pack)?.len(), kept, "{what}: pack cut after its last whole record");
        let more = blobs(100..102, 1000);
        s.append_verified(&bs[n..])?;
        s.append_verified(&more)?;
        drop(s);
        let s = PackStore::open(dir.path(), 0)?;
        assert_eq!(s.len(), 12, "{what}");
        assert_reads(&s, &bs)?;
        assert_reads(&s, &more)?;
    }
    Ok(())
}

#[test]
fn a_flipped_byte_drops_the_blob_with_a_warning() -> TestResult {
    let dir = tempdir()?;
    let bs = blobs(0..3, 100);
    let s = PackStore::open(dir.path(), 0)?;
    s.append_verified(&bs)?;
    let pack = fs::OpenOptions::new().read(true).write(true).open(files(dir.path(), "pack").remove(0))?;
    let mut byte = [0u8];
    pack.read_exact_at(&mut byte, HEADER as u64 + 5)?;
    pack.write_all_at(&[byte[0] ^ 0x10], HEADER as u64 + 5)?;
    let (got, logs) = with_logs(|| s.read(&bs[0].0));
    assert!(got?.is_none(), "a corrupt blob reads as absent");
    assert!(logs.contains("WARN") && logs.contains(&bs[0].0.to_string()), "warning names the digest: {logs}");
    assert!(!s.contains(&bs[0].0));
    assert_eq!(s.len(), 2);
    assert_reads(&s, &bs[1..])?;
    // The caller fetches it again and caches the good bytes.
    s.append_verified(&bs[..1])?;
    assert_reads(&s, &bs)
}

#[test]
fn the_bound_evicts_oldest_packs_but_keeps_what_is_read() -> TestResult {
    let dir = tempdir()?;
    let max = 4 << 20;
    let s = PackStore::open(dir.path(), max)?;
    let hot = blob(1_000_000, 64 << 10);
    s.append_verified(std::slice::from_ref(&hot))?;
    let bs = blobs(0..320, 64 << 10);
    for batch in bs.chunks(8) {
        s.append_verified(batch)?;
        assert!(s.total_bytes() <= max, "{} bytes held", s.total_bytes());
        assert_eq!(s.read(&hot.0)?.as_ref(), Some(&hot.1), "a blob in use is evicted");
    }
    assert!(disk_bytes(dir.path()) <= max, "{} bytes on disk", disk_bytes(dir.path()));
    assert_eq!(s.total_bytes(), disk_bytes(dir.path()));
    assert!(s.read(&bs[0].0)?.is_none() && !s.contains(&bs[0].0), "oldest blob evicted");
    let gone = bs.iter().filter(|(d, _)| !s.contains(d)).count();
    assert!(gone > 250, "only {gone} blobs evicted");
    assert_reads(&s, &bs[310..])?;
    assert_eq!(files(dir.path(), "idx").len(), files(dir.path(), "pack").len() - 1, "evicted packs' indexes go too");
    drop(s);
    let s = PackStore::open(dir.path(), max)?;
    assert!(s.total_bytes() <= max);
    assert_reads(&s, std::slice::from_ref(&hot))?;
    assert_reads(&s, &bs[310..])
}

#[test]
fn two_stores_append_to_one_folder_at_once() -> TestResult {
    let dir = tempdir()?;
    // 1 MiB packs, so both stores seal and start packs while the other appends.
    let max = 64 << 20;
    let (xs, ys) = (blobs(0..2000, 1000), blobs(2000..4000, 1000));
    let a = PackStore::open(dir.path(), max)?;
    let b = PackStore::open(dir.path(), max)?;
    std::thread::scope(|sc| -> crate::error::Result<()> {
        let ta = sc.spawn(|| xs.chunks(50).try_for_each(|c| a.append_verified(c)));
        // Some blobs both stores cache: each store skips only what it holds itself.
        let tb = sc.spawn(|| ys.chunks(50).chain(xs[..100].chunks(50)).try_for_each(|c| b.append_verified(c)));
        ta.join().expect("store a's thread")?;
        tb.join().expect("store b's thread")
    })?;
    assert_reads(&a, &xs)?;
    assert_reads(&b, &ys)?;
    drop(a);
    drop(b);
    assert_eq!(files(dir.path(), "idx").len(), files(dir.path(), "pack").len(), "every pack sealed");
    let c = PackStore::open(dir.path(), max)?;
    assert_eq!(c.len(), 4000);
    assert_reads(&c, &xs)?;
    assert_reads(&c, &ys)
}

#[test]
fn digest_size_empty_blob_and_bad_input() -> TestResult {
    let dir = tempdir()?;
    let s = PackStore::open(dir.path(), 0)?;
    let (d, b) = blob(1, 100);
    s.append_verified(&[(d, b)])?;
    let other = Digest::new_with(d.function(), d.hash_bytes(), 101).unwrap();
    assert!(!s.contains(&other) && s.read(&other)?.is_none(), "same hash, other size");
    let empty = Digest::of_bytes(b"");
    assert!(s.contains(&empty));
    assert_eq!(s.read(&empty)?, Some(Bytes::new()));
    s.append_verified(&[(empty, Bytes::new())])?;
    assert_eq!(s.len(), 1, "the empty blob is never written");
    let (before, on_disk) = (s.total_bytes(), disk_bytes(dir.path()));
    let fresh = blob(3, 10);
    let big = blob(2, MAX_BLOB as usize + 1);
    let wrong = (Digest::of_bytes(b"abc"), Bytes::from_static(b"abcd"));
    for bad in [big, wrong] {
        assert!(matches!(s.append_verified(&[fresh.clone(), bad]), Err(Error::Internal(_))));
    }
    assert!(!s.contains(&fresh.0), "nothing of a refused call is written");
    assert_eq!((s.len(), s.total_bytes(), disk_bytes(dir.path())), (1, before, on_disk));
    let largest = blob(4, MAX_BLOB as usize);
    s.append_verified(std::slice::from_ref(&largest))?;
    assert_reads(&s, &[largest])
}

#[test]
fn open_survives_strays_and_bad_files() -> TestResult {
    let dir = tempdir()?;
    let p = |n: &str| dir.path().join(n);
    let bs = blobs(0..5, 100);
    PackStore::open(dir.path(), 0)?.append_verified(&bs)?;
    fs::write(files(dir.path(), "idx").remove(0), b"not an index")?;
    for (name, body) in [
        ("0000000003-1-00000001.pack.tmp", &b""[..]),
        ("0000000004-1-00000002.idx", b"orphan index"),
        ("0000000006-1-00000004.pack", b"junk"),
        ("0000000009-1-zzzz.pack", b"not ours"),
        ("notes.txt", b"not ours"),
    ] {
        fs::write(p(name), body)?;
    }
    let s = PackStore::open(dir.path(), 0)?;
    assert_reads(&s, &bs)?;
    for gone in ["0000000003-1-00000001.pack.tmp", "0000000004-1-00000002.idx"] {
        assert!(!p(gone).exists(), "{gone} left behind");
    }
    assert!(!p("0000000006-1-00000004.pack").exists(), "a pack with no record is removed");
    assert!(p("0000000009-1-zzzz.pack").exists() && p("notes.txt").exists(), "unrelated files are left alone");
    drop(s);
    // The bad index was rebuilt from the pack.
    let idx = files(dir.path(), "idx").remove(0);
    let len = fs::metadata(files(dir.path(), "pack").remove(0))?.len();
    assert_eq!(read_idx(&idx, len)?.len(), 5);
    assert_reads(&PackStore::open(dir.path(), 0)?, &bs)
}

#[test]
fn throughput_of_small_blobs() -> TestResult {
    let bs: Vec<(Digest, Bytes)> = (0..100_000u64)
        .map(|i| {
            let b = Bytes::from(format!("{i:040}"));
            (Digest::of_bytes(&b), b)
        })
        .collect();
    let dir = tempdir()?;
    let s = PackStore::open(dir.path(), 0)?;
    let t = Instant::now();
    for batch in bs.chunks(256) {
        s.append_verified(batch)?;
    }
    let append = t.elapsed();
    let t = Instant::now();
    drop(s);
    let seal = t.elapsed();
    let t = Instant::now();
    let s = PackStore::open(dir.path(), 0)?;
    let reopen = t.elapsed();
    assert_eq!(s.len(), bs.len());
    assert_reads(&s, &bs.iter().step_by(997).cloned().collect::<Vec<_>>())?;
    drop(s);
    // A crashed writer's pack: no index, recovered by a scan.
    fs::remove_file(files(dir.path(), "idx").remove(0))?;
    let t = Instant::now();
    let s = PackStore::open(dir.path(), 0)?;
    let recover = t.elapsed();
    assert_eq!(s.len(), bs.len());
    eprintln!(
        "pack store, 100000 blobs of 40 B in batches of 256: append {append:?} ({:.2} us/blob), \
         seal on drop {seal:?}, reopen from index {reopen:?}, reopen by scan {recover:?}",
        append.as_secs_f64() * 1e6 / bs.len() as f64
    );
    Ok(())
}
