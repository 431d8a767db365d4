//! Slow and broken links between a mount and its server: a large file reads over a link far
//! slower than `--fetch-timeout` allows for the whole transfer, a server killed and
//! restarted mid-stream is resumed from where it stopped, and a server that stalls mid-stream
//! gives EIO within a bounded time. The link is a rate-limiting TCP proxy in the test. These
//! are about whole-blob streams, so chunked reads (tests/it/chunking.rs) are turned off.

use std::io::Read;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;
use crate::mount::MountProcess;

/// The link: 40 Mbit/s from server to client.
const RATE: u64 = 5_000_000;

/// A TCP proxy on 127.0.0.1 whose server-to-client direction is rate limited (one token
/// bucket for all connections), counted, and can be frozen; stops on drop.
pub struct Proxy {
    pub addr: SocketAddr,
    /// Bytes forwarded from the server to clients so far.
    pub down: Arc<AtomicU64>,
    /// Bytes forwarded from clients to the server so far.
    pub up: Arc<AtomicU64>,
    /// While set, nothing is forwarded in either direction (connections stay open).
    pub stalled: Arc<AtomicBool>,
    _rt: tokio::runtime::Runtime,
}

impl Proxy {
    /// Forwards connections to `upstream` at `rate` bytes per second, each chunk `delay` late.
    pub fn start(upstream: SocketAddr, rate: u64, delay: Duration) -> TestResult<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        let addr = listener.local_addr()?;
        let down = Arc::new(AtomicU64::new(0));
        let up = Arc::new(AtomicU64::new(0));
        let stalled = Arc::new(AtomicBool::new(false));
        let link = Arc::new(Link {
            rate,
            delay,
            next: Mutex::new(Instant::now()),
            down: down.clone(),
            up: up.clone(),
            stalled: stalled.clone(),
        });
        rt.spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let link = link.clone();
                tokio::spawn(async move {
                    // A server that is down: the client sees its connection closed.
                    let Ok(server) = tokio::net::TcpStream::connect(upstream).await else { return };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::select! {
                        _ = link.pump(cr, sw, false) => {}
                        _ = link.pump(sr, cw, true) => {}
                    }
                });
            }
        });
        Ok(Proxy { addr, down, up, stalled, _rt: rt })
    }

    /// The proxy's URL for clients.
    pub fn url(&self) -> String {
        format!("grpc://{}", self.addr)
    }

    /// Bytes forwarded from the server so far.
    pub fn down_bytes(&self) -> u64 {
        self.down.load(Ordering::Relaxed)
    }
}

struct Link {
    rate: u64,
    delay: Duration,
    /// When the bucket can send its next byte.
    next: Mutex<Instant>,
    down: Arc<AtomicU64>,
    up: Arc<AtomicU64>,
    stalled: Arc<AtomicBool>,
}

impl Link {
    /// Copies one direction until either side closes; `down` is the limited, counted one.
    async fn pump(
        &self,
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        down: bool,
    ) {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            while self.stalled.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if !self.delay.is_zero() {
                tokio::time::sleep(self.delay).await;
            }
            if down {
                let until = {
                    let mut next = self.next.lock().unwrap();
                    let start = (*next).max(Instant::now());
                    *next = start + Duration::from_secs_f64(n as f64 / self.rate as f64);
                    *next
                };
                tokio::time::sleep_until(until.into()).await;
            }
            if to.write_all(&buf[..n]).await.is_err() {
                return;
            }
            let counter = if down { &self.down } else { &self.up };
            counter.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

/// Uploads one file of `size` pseudo-random bytes; returns the tree's root and the file's
/// digest.
fn upload_big(dir: &Path, server_url: &str, size: usize) -> TestResult<(String, casfs::digest::Digest)> {
    let src = dir.join("src");
    std::fs::create_dir_all(&src)?;
    let big = pseudo_random(16, size);
    let digest = casfs::digest::Digest::of_bytes(&big);
    std::fs::write(src.join("big.bin"), &big)?;
    drop(big);
    let (code, out, err) = casfs(&["upload", src.to_str().ok_or("path")?, "--remote", server_url])?;
    assert_eq!(code, 0, "{err}");
    std::fs::remove_dir_all(&src)?;
    Ok((out.trim().to_string(), digest))
}

/// Reads a file through, hashing it.
fn digest_of(path: &Path) -> std::io::Result<casfs::digest::Digest> {
    let mut f = std::fs::File::open(path)?;
    let mut h = casfs::digest::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(h.finish());
        }
        h.update(&buf[..n]);
    }
}

fn upstream(url: &str) -> TestResult<SocketAddr> {
    Ok(url.strip_prefix("grpc://").ok_or("server url")?.parse()?)
}

/// Size of the large blob, in MiB (`CASFS_SLOW_LINK_MIB`; 500 MiB at 100 Mbit/s is what the
/// issue asks, scaled here to keep the test near 40 s on a shared machine).
fn big_size() -> usize {
    std::env::var("CASFS_SLOW_LINK_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(200) << 20
}

#[test]
fn a_large_file_reads_over_a_link_slower_than_the_fetch_timeout() -> TestResult {
    require_fuse!();
    let tmp = tempfile::tempdir()?;
    let server = ServeProcess::start(&tmp.path().join("storage"))?;
    let size = big_size();
    let (root, digest) = upload_big(tmp.path(), &server.url, size)?;
    let proxy = Proxy::start(upstream(&server.url)?, RATE, Duration::ZERO)?;
    let mnt = tmp.path().join("mnt");
    let m = MountProcess::start(&root, &mnt, &proxy.url(), &tmp.path().join("cache"), &["--fetch-timeout", "1s"])?;
    let started = Instant::now();
    let got = digest_of(&mnt.join("big.bin"));
    let took = started.elapsed();
    assert_eq!(got.map_err(|e| format!("{e}\n{}", m.log_text()))?, digest, "wrong bytes");
    // The test means something only if the whole transfer takes far longer than the
    // deadline: the proxy's rate makes it so (by construction, not by a clock).
    assert!(size as u64 / RATE >= 5, "{size} bytes at {RATE} B/s is not a slow transfer");
    assert!(proxy.down_bytes() >= size as u64, "the blob did not come through the proxy");
    eprintln!("{} MiB over {} Mbit/s with --fetch-timeout 1s: {took:.1?}", size >> 20, RATE * 8 / 1_000_000);
    Ok(())
}

#[test]
fn a_server_killed_mid_stream_is_resumed_from_its_offset() -> TestResult {
    require_fuse!();
    let tmp = tempfile::tempdir()?;
    let storage = tmp.path().join("storage");
    let listen = format!("127.0.0.1:{}", free_port()?);
    let mut server = ServeProcess::start_on(&storage, &listen)?;
    let size: usize = 64 << 20;
    let (root, digest) = upload_big(tmp.path(), &server.url, size)?;
    let proxy = Proxy::start(upstream(&server.url)?, RATE, Duration::ZERO)?;
    let mnt = tmp.path().join("mnt");
    let m = MountProcess::start(&root, &mnt, &proxy.url(), &tmp.path().join("cache"), &["--fetch-timeout", "2s"])?;
    let path = mnt.join("big.bin");
    let reader = std::thread::spawn(move || digest_of(&path));
    // The mount's bounded resumes end every read (bytes or EIO), so this loop ends too.
    while proxy.down_bytes() < size as u64 / 2 {
        assert!(!reader.is_finished(), "the reader ended before the server was killed\n{}", m.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    server.kill();
    let at_kill = proxy.down_bytes();
    std::thread::sleep(Duration::from_millis(300));
    let _server = ServeProcess::start_on(&storage, &listen)?;
    let got = reader.join().map_err(|_| "reader panicked")?;
    assert_eq!(got.map_err(|e| format!("{e}\n{}", m.log_text()))?, digest, "wrong bytes after the restart");
    let total = proxy.down_bytes();
    // Read again from byte 0, it would have taken at least `at_kill + size` bytes.
    assert!(
        total < at_kill + size as u64 * 3 / 4,
        "{total} bytes came through for a {size}-byte blob (killed at {at_kill}): the read restarted\n{}",
        m.log_text()
    );
    assert!(m.log_text().contains("resuming a download"), "{}", m.log_text());
    Ok(())
}

#[test]
fn a_server_stalled_mid_stream_gives_eio_in_bounded_time_then_recovers() -> TestResult {
    require_fuse!();
    let tmp = tempfile::tempdir()?;
    let server = ServeProcess::start(&tmp.path().join("storage"))?;
    let size: usize = 32 << 20;
    let (root, digest) = upload_big(tmp.path(), &server.url, size)?;
    let proxy = Proxy::start(upstream(&server.url)?, RATE, Duration::ZERO)?;
    let mnt = tmp.path().join("mnt");
    let m = MountProcess::start(&root, &mnt, &proxy.url(), &tmp.path().join("cache"), &["--fetch-timeout", "1s"])?;
    let path = mnt.join("big.bin");
    let cat = std::process::Command::new("timeout")
        .arg("60")
        .arg("cat")
        .arg(&path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let mut cat = cat;
    // `timeout 60` ends the reader whatever happens, so this loop ends too.
    while proxy.down_bytes() < size as u64 / 4 {
        assert!(cat.try_wait()?.is_none(), "the reader ended before a quarter of the blob\n{}", m.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    proxy.stalled.store(true, Ordering::Relaxed);
    let stalled_at = Instant::now();
    let out = cat.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    // 1 s without bytes, 5 resumes in a row with backoff: about 10 s. `timeout 60` only
    // guards against a hang.
    assert_ne!(out.status.code(), Some(124), "reader hung on a stalled server\n{}", m.log_text());
    assert!(!out.status.success(), "a stalled read succeeded");
    assert!(stderr.contains("Input/output error"), "{stderr}");
    assert!(m.log_text().contains("giving up on a download"), "{}", m.log_text());
    eprintln!("EIO {:.1?} after the stall", stalled_at.elapsed());
    // The link comes back: the same mount reads the file.
    proxy.stalled.store(false, Ordering::Relaxed);
    assert_eq!(digest_of(&mnt.join("big.bin"))?, digest);
    Ok(())
}

#[test]
fn casfs_download_resumes_after_a_server_restart() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let storage = tmp.path().join("storage");
    let listen = format!("127.0.0.1:{}", free_port()?);
    let mut server = ServeProcess::start_on(&storage, &listen)?;
    let size: usize = 32 << 20;
    let (root, digest) = upload_big(tmp.path(), &server.url, size)?;
    let proxy = Proxy::start(upstream(&server.url)?, RATE, Duration::ZERO)?;
    let dest = tmp.path().join("dest");
    let child = std::process::Command::new(casfs_bin())
        .args(["download", &root])
        .arg(&dest)
        .args(["--remote", &proxy.url(), "--rpc-timeout", "2s"])
        .env("CASFS_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let mut child = child;
    // The download's bounded resumes end it (bytes or an error), so this loop ends too.
    while proxy.down_bytes() < size as u64 / 2 {
        assert!(child.try_wait()?.is_none(), "the download ended before the server was killed");
        std::thread::sleep(Duration::from_millis(20));
    }
    server.kill();
    let at_kill = proxy.down_bytes();
    std::thread::sleep(Duration::from_millis(300));
    let _server = ServeProcess::start_on(&storage, &listen)?;
    let out = child.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(digest_of(&dest.join("big.bin"))?, digest, "wrong bytes after the restart");
    let total = proxy.down_bytes();
    assert!(
        total < at_kill + size as u64 * 3 / 4,
        "{total} bytes for {size} (killed at {at_kill}): restarted\n{stderr}"
    );
    assert!(stderr.contains("resuming a download"), "{stderr}");
    Ok(())
}

/// A server that sends a little and breaks off every time: the resumes are bounded, the
/// error is final, and answers about the blob itself are never retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumes_are_bounded_against_a_server_that_always_breaks_off() -> TestResult {
    use casfs::cas::resume::{resuming, Open, Resume};
    use futures::{FutureExt, StreamExt};
    let digest = casfs::digest::Digest::of_bytes(&vec![7u8; 1 << 20]);
    let opens = Arc::new(AtomicU64::new(0));
    let counted = opens.clone();
    let open: Open<'static> = Box::new(move |offset| {
        counted.fetch_add(1, Ordering::Relaxed);
        async move {
            assert!(offset < 1 << 20, "resumed past the end");
            let chunk = Ok(bytes::Bytes::from(vec![7u8; 100]));
            let broken = Err(casfs::Error::Remote {
                context: "test".into(),
                code: tonic::Code::Unknown,
                message: "h2 protocol error".into(),
            });
            Ok(futures::stream::iter([chunk, broken]).boxed())
        }
        .boxed()
    });
    let policy = Resume { idle: Duration::from_secs(5), retries: 3 };
    let results: Vec<_> = resuming(digest, open, policy, |_| {}).collect().await;
    let got: usize = results.iter().filter_map(|r| r.as_ref().ok()).map(|b| b.len()).sum();
    assert!(matches!(results.last(), Some(Err(_))), "the stream did not end with an error");
    let n = opens.load(Ordering::Relaxed);
    assert!(n <= 65, "{n} reads for one blob");
    assert_eq!(got as u64, n * 100, "every read resumed where the last one stopped");

    // An absent blob is not retried.
    let opens = Arc::new(AtomicU64::new(0));
    let counted = opens.clone();
    let open: Open<'static> = Box::new(move |_| {
        counted.fetch_add(1, Ordering::Relaxed);
        async move { Err(casfs::Error::MissingBlob(digest)) }.boxed()
    });
    let results: Vec<_> = resuming(digest, open, policy, |_| {}).collect().await;
    assert!(matches!(results.as_slice(), [Err(casfs::Error::MissingBlob(_))]), "{results:?}");
    assert_eq!(opens.load(Ordering::Relaxed), 1);

    // More bytes than the digest says: refused, not resumed.
    let open: Open<'static> = Box::new(move |_| {
        async move { Ok(futures::stream::iter([Ok(bytes::Bytes::from(vec![0u8; (1 << 20) + 1]))]).boxed()) }.boxed()
    });
    let results: Vec<_> = resuming(digest, open, policy, |_| {}).collect().await;
    assert!(matches!(results.as_slice(), [Err(casfs::Error::InvalidArgument(_))]), "{results:?}");
    Ok(())
}
