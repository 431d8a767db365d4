//! `casfs mount`: mount a Directory digest, as a daemon (default) or in the foreground.

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use casfs::error::{Error, Result};
use casfs::fs::{FetchConfig, FsConfig, Instances, MountConfig, OpenMode, Remote, RemoteFactory, Root};
use casfs::metrics::Metrics;

use super::{parse_duration, usage, CmdResult, RemoteArgs};

/// Options of `casfs mount`.
#[derive(Args)]
pub struct MountArgs {
    /// Root Directory digest (HASH/SIZE or HASH-SIZE), then the mountpoint; with --browse,
    /// only the mountpoint.
    #[arg(num_args = 1..=2, required = true, value_names = ["DIGEST", "MOUNTPOINT"])]
    pub args: Vec<String>,
    /// Mount the browse-by-digest namespace (every instance's blobs and action results)
    /// instead of one tree.
    #[arg(long)]
    pub browse: bool,
    #[command(flatten)]
    pub remote: RemoteArgs,
    #[command(flatten)]
    pub cache: super::CacheArgs,
    /// How long a fetch may go without progress before it is retried or the reader gets EIO.
    /// A Directory or small file must arrive whole within it; a large file only has to keep
    /// bringing bytes (no bytes for this long: the read resumes where it stopped, up to
    /// --retries times in a row, with backoff), so it reads over any slow link.
    #[arg(long, env = "CASFS_FETCH_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub fetch_timeout: Duration,
    /// How files are opened: auto, no-open, passthrough, open.
    #[arg(long, env = "CASFS_OPEN_MODE", default_value = "auto")]
    pub open_mode: OpenMode,
    /// FUSE worker threads.
    #[arg(long, env = "CASFS_FUSE_THREADS", default_value_t = 4)]
    pub threads: usize,
    /// Modification time of every node, in seconds since the epoch (2000-01-01 by default).
    #[arg(long, env = "CASFS_MTIME", default_value_t = 946_684_800)]
    pub mtime: u64,
    /// Name of the raw SHA-256 xattr (Bazel: --unix_digest_hash_attribute_name).
    #[arg(long, env = "CASFS_HASH_XATTR", default_value = "user.sha256")]
    pub hash_xattr: String,
    /// Fetch each file alone, never its small siblings with it.
    #[arg(long, env = "CASFS_NO_BATCH_SIBLINGS")]
    pub no_batch_siblings: bool,
    /// Listing a directory fetches the Directories below it in one stream, at most this many
    /// bytes of them per listed directory (0: off).
    #[arg(long, env = "CASFS_TREE_PREFETCH_BYTES", default_value = "64M", value_parser = super::parse_size)]
    pub tree_prefetch_bytes: u64,
    /// ... and at most this many Directories.
    #[arg(long, env = "CASFS_TREE_PREFETCH_DIRS", default_value_t = 100_000)]
    pub tree_prefetch_dirs: usize,
    /// A scan (files of a directory, or directories, read in order) fetches the next
    /// directories' small files ahead of the reader, up to this many bytes (0: off).
    #[arg(long, env = "CASFS_SCAN_AHEAD", default_value = "8M", value_parser = super::parse_size)]
    pub scan_ahead: u64,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9101).
    #[arg(long, env = "CASFS_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Stay in the foreground instead of detaching once mounted.
    #[arg(long, env = "CASFS_FOREGROUND")]
    pub foreground: bool,
    /// With --foreground: write "ready" to this file descriptor once mounted, then close it.
    #[arg(long)]
    pub ready_fd: Option<i32>,
    /// Write the daemon's pid here once mounted (removed at exit).
    #[arg(long, env = "CASFS_PIDFILE")]
    pub pidfile: Option<PathBuf>,
    /// Where a detached daemon writes its log (default: discarded).
    #[arg(long, env = "CASFS_LOG_FILE")]
    pub log_file: Option<PathBuf>,
}

/// How the daemon tells whoever started it that the mount is up.
pub enum Ready {
    /// Nobody is waiting.
    Nobody,
    /// A pipe or descriptor to write "ready" (or an error) to.
    Fd(OwnedFd),
}

impl Ready {
    fn send(&mut self, msg: &str) {
        if let Ready::Fd(fd) = std::mem::replace(self, Ready::Nobody) {
            let mut f = std::fs::File::from(fd);
            let _ = f.write_all(msg.as_bytes());
        }
    }
}

/// Detaches unless `--foreground`: forks before any thread exists; the parent waits until the
/// child reports the mount up (exit 0) or failed (exit 1). Returns the child's `Ready`, or the
/// exit code for the parent.
pub fn prepare(args: &MountArgs) -> std::result::Result<Ready, u8> {
    compact_malloc();
    if args.foreground {
        return Ok(match args.ready_fd {
            // SAFETY: the caller handed us this descriptor for the readiness report; nothing
            // else in the process owns it.
            Some(fd) if fd > 2 => Ready::Fd(unsafe { OwnedFd::from_raw_fd(fd) }),
            _ => Ready::Nobody,
        });
    }
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the two-element array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        eprintln!("casfs: pipe: {}", std::io::Error::last_os_error());
        return Err(1);
    }
    // SAFETY: pipe2 just made both descriptors; each gets exactly one owner.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: called from main before any thread (runtime, logging) exists, so the child is
    // a complete copy of a single-threaded process.
    match unsafe { libc::fork() } {
        -1 => {
            eprintln!("casfs: fork: {}", std::io::Error::last_os_error());
            Err(1)
        }
        0 => {
            drop(r);
            // SAFETY: setsid takes no arguments; the child leaves the caller's session.
            unsafe { libc::setsid() };
            redirect_stdio(args.log_file.as_deref());
            Ok(Ready::Fd(w))
        }
        _ => {
            drop(w);
            let mut msg = String::new();
            let _ = std::fs::File::from(r).read_to_string(&mut msg);
            if msg.trim() == "ready" {
                Err(0)
            } else {
                let msg = if msg.trim().is_empty() { "the mount daemon exited before mounting".into() } else { msg };
                eprintln!("casfs: {}", msg.trim());
                Err(1)
            }
        }
    }
}

/// Keeps the daemon's heap close to what it holds: with glibc's defaults, a freed large
/// buffer (a Directory's bytes) raises the mmap threshold to 32 MiB, after which growing
/// tables and listings are carved from per-thread arenas and leave holes that are never
/// given back (a 1M-entry `ls -l` held ~100 MB more, varying run to run). Blocks of 1 MiB
/// and more get their own mappings (returned when freed), and at most 4 arenas exist.
fn compact_malloc() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets allocator parameters; called before any thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 4);
    }
}

fn redirect_stdio(log: Option<&std::path::Path>) {
    let null = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null");
    let out = match log {
        Some(p) => std::fs::OpenOptions::new().create(true).append(true).open(p),
        None => std::fs::OpenOptions::new().write(true).open("/dev/null"),
    };
    use std::os::fd::AsRawFd;
    if let Ok(n) = &null {
        // SAFETY: dup2 onto the standard descriptors from a file we hold open.
        unsafe { libc::dup2(n.as_raw_fd(), 0) };
    }
    if let Ok(o) = &out {
        // SAFETY: as above.
        unsafe {
            libc::dup2(o.as_raw_fd(), 1);
            libc::dup2(o.as_raw_fd(), 2);
        }
    }
}

/// Resolves once the mount was taken away from outside (`umount`, `umount -l`, systemd).
async fn gone(guard: &casfs::fs::MountGuard) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        if guard.is_gone() {
            return;
        }
    }
}

/// Mounts, reports readiness, waits for SIGINT/SIGTERM or an unmount from outside, then
/// unmounts (if still mounted) and flushes the cache.
pub async fn run(args: MountArgs, mut ready: Ready) -> CmdResult {
    let res = mount_and_wait(args, &mut ready).await;
    if let Err(e) = &res {
        ready.send(&e.to_string());
    }
    res
}

async fn mount_and_wait(args: MountArgs, ready: &mut Ready) -> CmdResult {
    let (root, mountpoint) = match (args.browse, args.args.as_slice()) {
        (true, [mp]) => {
            let remote_args = args.remote.clone();
            let factory: RemoteFactory = Arc::new(move |instance: &str| {
                let mut r = remote_args.clone();
                r.conn.instance_name = instance.to_string();
                let store = Arc::new(r.store()?);
                Ok(Remote { cas: store.clone(), ac: Some(store) })
            });
            (Root::Browse(Instances::on_demand(factory)), PathBuf::from(mp))
        }
        (false, [digest, mp]) => {
            let d = args.remote.digest(digest)?;
            let store = Arc::new(args.remote.store()?);
            (Root::Digest(d, Remote::new(store.clone(), Some(store))), PathBuf::from(mp))
        }
        (true, _) => return Err(usage("with --browse give only the mountpoint")),
        (false, _) => return Err(usage("give a DIGEST and a MOUNTPOINT (or --browse MOUNTPOINT)")),
    };
    let metrics = Metrics::new();
    let cache = args.cache.open(&metrics)?;
    if let Some(addr) = &args.metrics_listen {
        let l = tokio::net::TcpListener::bind(addr).await.map_err(|e| Error::io(format!("binding {addr}"), e))?;
        tokio::spawn(casfs::metrics::serve(l, metrics.clone()));
    }
    let mut cfg = MountConfig::new(&mountpoint);
    cfg.open_mode = args.open_mode;
    cfg.threads = args.threads;
    cfg.fs = FsConfig {
        mtime: std::time::UNIX_EPOCH + Duration::from_secs(args.mtime),
        hash_xattr: args.hash_xattr.clone(),
        ..FsConfig::default()
    };
    cfg.fetch = FetchConfig {
        deadline: args.fetch_timeout,
        retries: args.remote.conn.retries,
        batch_siblings: !args.no_batch_siblings,
        tree_prefetch_bytes: args.tree_prefetch_bytes,
        tree_prefetch_dirs: args.tree_prefetch_dirs,
        scan_ahead_bytes: args.scan_ahead,
        ..args.cache.fetch_config()
    };
    let stop = super::signals::Shutdown::install();
    let guard = casfs::fs::mount(root, cache.clone(), cfg, metrics)?;
    if let Some(p) = &args.pidfile {
        std::fs::write(p, format!("{}\n", std::process::id()))
            .map_err(|e| Error::io(format!("writing {}", p.display()), e))?;
    }
    ready.send("ready\n");
    tokio::select! {
        _ = stop.wait() => tracing::info!(mountpoint = %mountpoint.display(), "signal received; the daemon unmounts and exits"),
        _ = gone(&guard) => {
            tracing::info!(mountpoint = %mountpoint.display(), "unmounted from outside; the daemon exits");
        }
    }
    let res: Result<()> = tokio::task::block_in_place(|| guard.unmount());
    // Blobs served from memory reach the disk cache before the daemon goes away.
    let _ = tokio::task::spawn_blocking(move || cache.flush()).await;
    if let Some(p) = &args.pidfile {
        let _ = std::fs::remove_file(p);
    }
    Ok(res?)
}
