//! Access profiles against a real server and real lazy input mounts: a second run of a
//! similar action finds the first run's profile and prefetches it; profiles naming absent
//! paths, garbage profiles, huge hostile profiles and a server lying about prefetched blobs
//! all leave results identical to a run without profiles, and no wrong byte is ever cached.

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use prost::Message;

use casfs::cache::LocalCache;
use casfs::cas::{ActionCache, ByteStream, Cas, GrpcStore, MemoryStore, RemoteConfig};
use casfs::digest::Digest;
use casfs::exec::profile::{self, OUTPUT_NAME};
use casfs::exec::{CachedExecutor, ExecConfig, Executor, Limits, Materialize, ProfileConfig, SandboxConfig};
use casfs::fs::record::Entry;
use casfs::fs::FetchConfig;
use casfs::metrics::Metrics;
use casfs::proto::reapi;
use casfs::server::Backend;

use crate::common::*;
use crate::exec::{upload_action, Act};

/// A memory store that returns wrong bytes (of the right length) for the digests in `lies`.
#[derive(Default)]
struct Liar {
    inner: MemoryStore,
    lies: Mutex<HashSet<Digest>>,
    told: AtomicU64,
}

impl Liar {
    fn lie(&self, d: &Digest) -> Option<Bytes> {
        if !self.lies.lock().unwrap().contains(d) {
            return None;
        }
        self.told.fetch_add(1, Ordering::Relaxed);
        Some(Bytes::from(vec![b'X'; d.size() as usize]))
    }
}

#[tonic::async_trait]
impl Cas for Liar {
    async fn find_missing(&self, digests: &[Digest]) -> casfs::Result<Vec<Digest>> {
        self.inner.find_missing(digests).await
    }
    async fn read_stream(&self, d: &Digest, offset: u64, limit: u64) -> casfs::Result<ByteStream> {
        match self.lie(d) {
            Some(b) => Ok(futures::stream::once(async move { Ok(b) }).boxed()),
            None => self.inner.read_stream(d, offset, limit).await,
        }
    }
    async fn write_stream(&self, d: &Digest, data: ByteStream) -> casfs::Result<()> {
        self.inner.write_stream(d, data).await
    }
    async fn read(&self, d: &Digest) -> casfs::Result<Bytes> {
        match self.lie(d) {
            Some(b) => Ok(b),
            None => self.inner.read(d).await,
        }
    }
    async fn read_many(&self, digests: &[Digest]) -> casfs::Result<Vec<(Digest, casfs::Result<Bytes>)>> {
        let mut out = Vec::new();
        for d in digests {
            out.push((*d, self.read(d).await));
        }
        Ok(out)
    }
}

#[tonic::async_trait]
impl ActionCache for Liar {
    async fn get_action_result(&self, a: &Digest) -> casfs::Result<Option<reapi::ActionResult>> {
        self.inner.get_action_result(a).await
    }
    async fn update_action_result(&self, a: &Digest, r: &reapi::ActionResult) -> casfs::Result<()> {
        self.inner.update_action_result(a, r).await
    }
}

/// An in-process server over a [`Liar`], and a client of it.
struct Rig {
    tmp: tempfile::TempDir,
    store: Arc<Liar>,
    client: Arc<GrpcStore>,
    _server: InProcessServer,
    runs: u32,
}

/// One run's executor, its own cold cache and its metrics.
struct Run {
    exec: CachedExecutor,
    cache: Arc<LocalCache>,
}

impl Run {
    fn metric(&self, name: &str) -> u64 {
        self.exec.metrics().get(name)
    }
}

async fn rig() -> TestResult<Rig> {
    let store = Arc::new(Liar::default());
    let server = serve_in_process(Backend::new(store.clone(), store.clone())).await?;
    let client = Arc::new(GrpcStore::new(&RemoteConfig::new(&server.url))?);
    Ok(Rig { tmp: tempfile::tempdir()?, store, client, _server: server, runs: 0 })
}

impl Rig {
    /// A fresh executor (cold cache) with profiles on or off.
    fn executor(&mut self, profiles: bool) -> TestResult<Run> {
        self.runs += 1;
        let dir = self.tmp.path().join(format!("run-{}", self.runs));
        let cache = local_cache(&dir.join("cache"))?;
        let cfg = ExecConfig {
            materialize: Materialize::Lazy,
            work_dir: dir.join("work"),
            limits: Limits { default_timeout: Duration::from_secs(120), ..Limits::default() },
            sandbox: SandboxConfig::default(),
            worker_name: "profiles-test".into(),
            fetch: FetchConfig { deadline: Duration::from_secs(20), ..FetchConfig::default() },
        };
        let exec = Executor::new(self.client.clone(), cache.clone(), cfg, Metrics::new())
            .with_profiles(ProfileConfig { enabled: profiles, ..ProfileConfig::default() });
        Ok(Run { exec: CachedExecutor::new(Arc::new(exec), self.client.clone()), cache })
    }

    /// Runs `action` on a fresh executor; returns the comparable result and the run.
    async fn run(&mut self, action: Digest, profiles: bool) -> TestResult<(reapi::ActionResult, Run)> {
        let r = self.executor(profiles)?;
        let o = r.exec.execute(action, true).await?;
        assert_eq!(o.status.code, 0, "{:?}", o.status);
        assert_eq!(o.result.exit_code, 0, "{:?}", o.result);
        let mut result = o.result;
        result.execution_metadata = None;
        Ok((result, r))
    }

    /// The profile key of an uploaded action.
    async fn key(&self, action: Digest) -> TestResult<Digest> {
        let a = reapi::Action::decode(self.client.read(&action).await?)?;
        let cd = Digest::try_from(a.command_digest.as_ref().ok_or("no command")?)?;
        let c = reapi::Command::decode(self.client.read(&cd).await?)?;
        Ok(profile::key(&c, &a))
    }

    /// Points the profile entry of `key` at a blob of `bytes` (stored) or at `digest`.
    async fn plant(&self, key: Digest, bytes: Option<Vec<u8>>, digest: Option<Digest>) -> TestResult {
        let d = match (bytes, digest) {
            (Some(b), _) => {
                let d = Digest::of_bytes(&b);
                self.store.write(&d, b.into()).await?;
                d
            }
            (None, Some(d)) => d,
            (None, None) => return Err("nothing to plant".into()),
        };
        let r = reapi::ActionResult {
            output_files: vec![reapi::OutputFile {
                path: OUTPUT_NAME.into(),
                digest: Some(d.to_proto()),
                ..Default::default()
            }],
            ..Default::default()
        };
        self.store.update_action_result(&key, &r).await?;
        Ok(())
    }
}

const DIRS: usize = 12;
const FILES: usize = 6;

/// 12 folders of 6 small files and one large file.
fn make_input(root: &Path) -> TestResult {
    for d in 0..DIRS {
        let p = root.join(format!("d{d}"));
        std::fs::create_dir_all(&p)?;
        for f in 0..FILES {
            std::fs::write(p.join(format!("f{f}")), format!("folder {d} file {f}\n"))?;
        }
    }
    std::fs::write(root.join("big"), pseudo_random(17, 700 << 10))?;
    Ok(())
}

/// Reads the first file of every folder and the large file (after `pause`, so a prefetch
/// has run by then).
fn reader(pause: &str) -> String {
    let files: Vec<String> = (0..DIRS).map(|d| format!("d{d}/f0")).collect();
    format!("sleep {pause}; mkdir -p out; cat {} big | sha256sum > out/sum", files.join(" "))
}

async fn upload(r: &Rig, input: &Path, script: &str) -> TestResult<Digest> {
    let argv = ["sh", "-c", script];
    upload_action(&r.client, input, &Act { argv: &argv, output_files: &["out/sum"], ..Default::default() }).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_similar_second_run_prefetches_its_profile_with_identical_results() -> TestResult {
    require_fuse!();
    let mut r = rig().await?;
    let input = r.tmp.path().join("input");
    make_input(&input)?;
    let script = reader("0");
    let first = upload(&r, &input, &script).await?;
    let (res1, run1) = r.run(first, true).await?;
    assert_eq!(run1.metric("casfs_profile_misses_total"), 1);
    assert_eq!(run1.metric("casfs_profile_writes_total"), 1);
    // One input file changed (one the command does not read): a new input root, the same key.
    std::fs::write(input.join("d3/f4"), "changed\n")?;
    let second = upload(&r, &input, &script).await?;
    assert_ne!(first, second);
    let (res2, run2) = r.run(second, true).await?;
    assert_eq!(run2.metric("casfs_profile_hits_total"), 1);
    assert!(run2.metric("casfs_prefetch_blobs_total") > 0, "nothing prefetched");
    assert_eq!(run2.metric("casfs_prefetch_unused_bytes_total"), 0, "the profile named unread files");
    // Same lookups as the profile says: nothing to write.
    assert_eq!(run2.metric("casfs_profile_writes_total"), 0);
    let (plain, off) = r.run(second, false).await?;
    assert_eq!(off.metric("casfs_profile_hits_total") + off.metric("casfs_profile_misses_total"), 0);
    assert_eq!(res2, plain);
    assert_eq!(res1.output_files, res2.output_files);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn absent_garbage_and_huge_profiles_change_nothing() -> TestResult {
    require_fuse!();
    let mut r = rig().await?;
    let input = r.tmp.path().join("input");
    make_input(&input)?;
    let action = upload(&r, &input, &reader("0.3")).await?;
    let key = r.key(action).await?;
    let (reference, _) = r.run(action, false).await?;
    let tree_blobs = (DIRS * FILES + DIRS + 2) as u64;

    // (b) Paths the new root lacks are skipped; those it has are prefetched.
    let mut e = vec![Entry { path: "gone".into(), dir: true }, Entry { path: "gone/f0".into(), dir: false }];
    e.push(Entry { path: "d0/missing".into(), dir: false });
    e.push(Entry { path: "d1".into(), dir: true });
    e.push(Entry { path: "d1/f0".into(), dir: false });
    r.plant(key, Some(profile::encode(&e)), None).await?;
    let (got, run) = r.run(action, true).await?;
    assert_eq!(got, reference);
    assert_eq!(run.metric("casfs_profile_hits_total"), 1);
    assert!(run.metric("casfs_prefetch_blobs_total") <= 3, "prefetched beyond the root, d1 and d1/f0");

    // (c) Garbage bytes, and a blob absurdly large: unusable, so a miss.
    r.plant(key, Some(b"\xff\x00garbage\nf ../../etc/passwd\n".to_vec()), None).await?;
    let (got, run) = r.run(action, true).await?;
    assert_eq!(got, reference);
    assert_eq!((run.metric("casfs_profile_invalid_total"), run.metric("casfs_profile_hits_total")), (1, 0));
    // (The server itself may hide an entry naming an absent blob: a miss either way.)
    r.plant(key, None, Some(Digest::new([7; 32], 1 << 40))).await?;
    let (got, run) = r.run(action, true).await?;
    assert_eq!(got, reference);
    assert_eq!((run.metric("casfs_profile_misses_total"), run.metric("casfs_profile_hits_total")), (1, 0));

    // The attack: a profile of 400,000 lines (escapes, absolute paths, deep absent paths)
    // costs at most the tree's own blobs.
    let mut text = String::from("casfs-access-profile 1\n");
    for i in 0..400_000 {
        match i % 4 {
            0 => text.push_str(&format!("f ../x{i}\n")),
            1 => text.push_str(&format!("f /abs{i}\n")),
            2 => text.push_str(&format!("d d{}/n{i}/deeper\n", i % DIRS)),
            _ => text.push_str(&format!("f d{}/f{}\n", i % DIRS, i % 100)),
        }
    }
    r.plant(key, Some(text.into_bytes()), None).await?;
    let (got, run) = r.run(action, true).await?;
    assert_eq!(got, reference);
    assert_eq!(run.metric("casfs_profile_hits_total"), 1);
    assert!(run.metric("casfs_prefetch_blobs_total") <= tree_blobs, "prefetched more than the tree holds");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_server_lying_about_prefetched_blobs_never_gets_wrong_bytes_cached() -> TestResult {
    require_fuse!();
    let mut r = rig().await?;
    let input = r.tmp.path().join("input");
    make_input(&input)?;
    // The command pauses before reading, so the prefetch (of the whole tree: no profile
    // yet) asks for the files the server lies about meanwhile.
    let action = upload(&r, &input, &reader("1")).await?;
    let (reference, _) = r.run(action, false).await?;
    let liedabout: Vec<Digest> =
        [b"folder 5 file 1\n".to_vec(), b"folder 7 file 2\n".to_vec()].iter().map(|b| Digest::of_bytes(b)).collect();
    r.store.lies.lock().unwrap().extend(liedabout.iter().copied());
    let (got, run) = r.run(action, true).await?;
    assert_eq!(got, reference);
    assert!(r.store.told.load(Ordering::Relaxed) > 0, "the prefetch never asked for a lied-about blob");
    for d in &liedabout {
        assert!(!run.cache.contains(d), "a wrong blob {d} reached the cache");
    }
    // With the profile the first run stored (which does not name them), the same.
    let (got, run) = r.run(action, true).await?;
    assert_eq!(got, reference);
    assert_eq!(run.metric("casfs_profile_hits_total"), 1);
    Ok(())
}
