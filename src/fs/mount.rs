//! Mount lifecycle: preflight checks, stale-mount cleanup, mounting, and unmount on drop.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::browse::Instances;
use super::core::{CasFs, FsConfig};
use super::fetch::{FetchConfig, Fetcher, Remote};
use super::fuse::{FuseAdapter, OpenMode};
use super::node::Node;
use crate::cache::LocalCache;
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::metrics::Metrics;

/// How to mount.
#[derive(Clone, Debug)]
pub struct MountConfig {
    /// Where to mount (an existing directory).
    pub mountpoint: PathBuf,
    /// How the kernel opens files.
    pub open_mode: OpenMode,
    /// FUSE worker threads.
    pub threads: usize,
    /// Let users other than the mounting one in (`allow_other`).
    pub allow_other: bool,
    /// Attribute and xattr choices.
    pub fs: FsConfig,
    /// Fetch deadline and cache bounds.
    pub fetch: FetchConfig,
}

impl MountConfig {
    /// Defaults for everything but the mountpoint.
    pub fn new(mountpoint: impl Into<PathBuf>) -> Self {
        MountConfig {
            mountpoint: mountpoint.into(),
            open_mode: OpenMode::Auto,
            threads: 4,
            // SAFETY: geteuid only reads the calling process's credentials.
            allow_other: unsafe { libc::geteuid() } == 0,
            fs: FsConfig::default(),
            fetch: FetchConfig::default(),
        }
    }
}

/// A live mount; unmounts when dropped (lazily if something still uses it).
pub struct MountGuard {
    session: Option<fuser::BackgroundSession>,
    mountpoint: PathBuf,
    /// The mount's device, `major:minor` as mountinfo writes it (the minor is also the FUSE
    /// connection's number): tells our mount from whatever else is mounted at the path.
    device: String,
    fs: Arc<CasFs>,
}

impl MountGuard {
    /// The mounted filesystem (inode counts, fetcher, metrics).
    pub fn fs(&self) -> &Arc<CasFs> {
        &self.fs
    }

    /// Where it is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// True once the filesystem was unmounted from outside (`umount`, `umount -l`, systemd):
    /// the session ended, or the mount no longer shows at its mountpoint. A mount daemon then
    /// has nothing left to serve.
    pub fn is_gone(&self) -> bool {
        self.session.as_ref().is_none_or(|s| s.guard.is_finished())
            || mounted_device(&self.mountpoint).as_deref() != Some(&self.device)
    }

    /// Unmounts now, reporting failure (a busy mount is detached lazily instead).
    pub fn unmount(mut self) -> Result<()> {
        self.unmount_inner()
    }

    fn unmount_inner(&mut self) -> Result<()> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        if mounted_device(&self.mountpoint).as_deref() != Some(&self.device) {
            // Unmounted from outside. What is at the path now is not ours to unmount; readers
            // of a lazily detached mount are cut off, so nothing waits on this daemon.
            if let Some(minor) = self.device.split(':').nth(1) {
                abort_connection(minor);
            }
            drop(session);
            return Ok(());
        }
        if let Err(e) = session.umount_and_join() {
            tracing::warn!(mountpoint = %self.mountpoint.display(), error = %e, "unmount failed; detaching lazily");
            detach(&self.mountpoint)?;
        }
        // A busy unmount can leave the entry behind; make sure nothing stays mounted.
        if is_mounted(&self.mountpoint) {
            detach(&self.mountpoint)?;
        }
        Ok(())
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        if let Err(e) = self.unmount_inner() {
            tracing::error!(mountpoint = %self.mountpoint.display(), error = %e, "could not unmount");
        }
    }
}

fn unescape_mountinfo(s: &str) -> String {
    // /proc/self/mountinfo escapes space, tab, newline and backslash as \ooo.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// True when something is mounted exactly at `path` (read from /proc/self/mountinfo, which
/// also sees dead FUSE mounts that `stat` cannot).
pub fn is_mounted(path: &Path) -> bool {
    mounted_device(path).is_some()
}

/// The device (`major:minor`) of the topmost mount exactly at `path`, if any.
fn mounted_device(path: &Path) -> Option<String> {
    let abs = std::path::absolute(path).ok()?;
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().rev().find_map(|l| {
        let mut f = l.split(' ');
        let dev = f.nth(2)?;
        let mp = f.nth(1)?;
        (Path::new(&unescape_mountinfo(mp)) == abs).then(|| dev.to_string())
    })
}

/// Aborts the FUSE connection of the filesystem mounted at `path`, if it is one: every
/// request still waiting on it fails at once. A FUSE daemon killed while one of its own
/// threads waited on its mount cannot finish dying (that request is never answered), and
/// stays a zombie holding its sockets until the connection is aborted. Returns whether a
/// connection was aborted. Mounts fusectl on /sys/fs/fuse/connections when needed.
pub fn abort_fuse(path: &Path) -> bool {
    let Ok(abs) = std::path::absolute(path) else { return false };
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return false };
    let minor = info.lines().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        let fstype = f.iter().skip_while(|x| **x != "-").nth(1)?;
        let here = Path::new(&unescape_mountinfo(f.get(4)?)) == abs;
        (here && fstype.starts_with("fuse")).then(|| f.get(2)?.split(':').nth(1).map(str::to_string))?
    });
    let Some(minor) = minor else { return false };
    if abort_connection(&minor) {
        tracing::warn!(path = %abs.display(), connection = %minor, "aborted the FUSE connection of a stale mount");
        return true;
    }
    false
}

/// Aborts FUSE connection `minor`: every request waiting on it fails at once and its
/// daemon's reads end. Mounts fusectl on /sys/fs/fuse/connections when needed.
fn abort_connection(minor: &str) -> bool {
    let conns = Path::new("/sys/fs/fuse/connections");
    if !conns.join(minor).exists() {
        // Not mounted yet on this host (it is a pseudo filesystem; mounting it is harmless).
        let none = c"none";
        let target = c"/sys/fs/fuse/connections";
        // SAFETY: the strings are NUL-terminated literals; fusectl takes no data.
        unsafe { libc::mount(none.as_ptr(), target.as_ptr(), c"fusectl".as_ptr(), 0, std::ptr::null()) };
    }
    match std::fs::write(conns.join(minor).join("abort"), "1") {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!(connection = %minor, error = %e, "could not abort the FUSE connection");
            false
        }
    }
}

/// Lazily detaches whatever is mounted at `path`.
pub fn detach(path: &Path) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Error::InvalidArgument(format!("{} contains NUL", path.display())))?;
    // SAFETY: `c` is a NUL-terminated path that outlives the call.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINVAL) {
            return Err(Error::io(format!("unmounting {}", path.display()), e));
        }
    }
    Ok(())
}

/// Checks /dev/fuse and the mountpoint, and clears a stale mount left by a killed daemon.
pub fn preflight(mountpoint: &Path) -> Result<()> {
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/fuse") {
        let why = match e.raw_os_error() {
            Some(libc::ENOENT) => {
                "no /dev/fuse: load the fuse module (modprobe fuse), or pass the device into the container"
            }
            Some(libc::EACCES) | Some(libc::EPERM) => {
                "no permission to open /dev/fuse: run as root, or install fuse3 (fusermount3) and use an allowed user"
            }
            _ => "cannot open /dev/fuse",
        };
        return Err(Error::FailedPrecondition(format!("{why} ({e})")));
    }
    if is_mounted(mountpoint) {
        tracing::warn!(mountpoint = %mountpoint.display(), "clearing a stale mount");
        detach(mountpoint)?;
    }
    let meta =
        std::fs::metadata(mountpoint).map_err(|e| Error::io(format!("mountpoint {}", mountpoint.display()), e))?;
    if !meta.is_dir() {
        return Err(Error::InvalidArgument(format!("mountpoint {} is not a directory", mountpoint.display())));
    }
    Ok(())
}

/// What a mount shows.
pub enum Root {
    /// The tree of a Directory digest, read from one remote.
    Digest(Digest, Arc<Remote>),
    /// The browse-by-digest namespace over these instances.
    Browse(Instances),
}

impl std::fmt::Debug for Root {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Root::Digest(d, _) => write!(f, "Digest({d})"),
            Root::Browse(_) => write!(f, "Browse"),
        }
    }
}

/// Mounts `root`, read lazily through the local blob cache `cache`. Must be called inside a
/// tokio runtime, which runs the fetches. Blobs the mount fetched may still be on their way
/// to disk when it is unmounted: whoever owns the cache flushes it before the process ends.
///
/// ```no_run
/// # async fn demo(root: casfs::Digest) -> casfs::Result<()> {
/// use std::sync::Arc;
/// use casfs::cache::{CacheConfig, LocalCache};
/// use casfs::cas::{GrpcStore, RemoteConfig};
/// use casfs::fs::{mount, MountConfig, Remote, Root};
/// let remote = Arc::new(GrpcStore::new(&RemoteConfig::new("grpc://127.0.0.1:8980"))?);
/// let metrics = casfs::metrics::Metrics::new();
/// let cache = LocalCache::open(&CacheConfig::new("/var/cache/casfs", 10 << 30), &metrics)?;
/// let root = Root::Digest(root, Remote::new(remote, None));
/// let guard = mount(root, cache.clone(), MountConfig::new("/mnt/input"), metrics)?;
/// // ... run something that reads /mnt/input ...
/// drop(guard); // unmounts
/// cache.flush(); // everything fetched is on disk
/// # Ok(()) }
/// ```
pub fn mount(root: Root, cache: Arc<LocalCache>, cfg: MountConfig, metrics: Arc<Metrics>) -> Result<MountGuard> {
    preflight(&cfg.mountpoint)?;
    let rt = tokio::runtime::Handle::try_current()
        .map_err(|_| Error::Internal("casfs::fs::mount needs a tokio runtime".into()))?;
    let fetcher = Fetcher::new(cache, cfg.fetch.clone(), metrics);
    let name = match &root {
        Root::Digest(d, _) => format!("casfs:{}", d.to_path_form()),
        Root::Browse(_) => "casfs:browse".to_string(),
    };
    tracing::info!(root = ?root, mountpoint = %cfg.mountpoint.display(), "mounting");
    let node = match root {
        Root::Digest(digest, remote) => Node::Dir { digest, remote },
        Root::Browse(instances) => super::browse::root(fetcher.clone(), instances),
    };
    let fs = CasFs::new(node, fetcher, cfg.fs.clone());
    let adapter = FuseAdapter::new(fs.clone(), rt, cfg.open_mode);
    let mut fc = fuser::Config::default();
    fc.mount_options = vec![
        fuser::MountOption::FSName(name),
        fuser::MountOption::Subtype("casfs".into()),
        fuser::MountOption::RO,
        fuser::MountOption::NoDev,
        fuser::MountOption::NoSuid,
        fuser::MountOption::DefaultPermissions,
    ];
    if cfg.allow_other {
        fc.acl = fuser::SessionACL::All;
    }
    fc.n_threads = Some(cfg.threads.max(1));
    fc.clone_fd = cfg.threads > 1;
    let session = fuser::spawn_mount(adapter, &cfg.mountpoint, &fc)
        .map_err(|e| Error::io(format!("mounting at {}", cfg.mountpoint.display()), e))?;
    let notifier = session.notifier();
    fs.store_pages_with(Box::new(move |ino, data| notifier.store(fuser::INodeNo(ino), 0, data)));
    let device = mounted_device(&cfg.mountpoint).unwrap_or_default();
    let guard = MountGuard { session: Some(session), mountpoint: cfg.mountpoint.clone(), device, fs };
    raise_readahead(&cfg.mountpoint);
    tracing::info!(mountpoint = %cfg.mountpoint.display(), "mounted");
    Ok(guard)
}

/// The kernel caps FUSE readahead at 128 KiB unless the mount's bdi is told otherwise;
/// 1 MiB reads make large sequential reads cheaper. Best effort.
fn raise_readahead(mountpoint: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(mountpoint) else {
        return;
    };
    let dev = meta.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let path = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    if let Err(e) = std::fs::write(&path, "1024") {
        tracing::debug!(path, error = %e, "could not raise readahead");
    }
}
