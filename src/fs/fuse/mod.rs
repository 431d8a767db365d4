//! The only fuser adapter: converts kernel requests to `CasFs` calls and replies, handing
//! anything that may wait on a fetch to the tokio runtime so no FUSE thread ever blocks on it.

use std::ffi::OsStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig,
    LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyXattr, Request,
};

use super::core::CasFs;
use passthrough::Passthrough;

mod passthrough;
use super::node::{Attr, Kind, Listing};
use crate::error::Error;

/// Content never changes under a digest, so the kernel may cache names and attributes for
/// as long as it likes.
const TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// Opens of small files `auto` answers before it tells the kernel to stop asking.
pub const NO_OPEN_AFTER: u64 = 1000;
/// Files larger than this are opened with passthrough to their verified backing file;
/// smaller ones are read through the daemon once, then from the kernel's page cache.
pub const PASSTHROUGH_MIN: u64 = super::fetch::SMALL_BLOB;

/// How the kernel opens files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenMode {
    /// Passthrough for large files until small ones dominate: opens are answered (large
    /// files with passthrough, small ones keeping their page cache) until `NO_OPEN_AFTER`
    /// opens of small files were, then refused with ENOSYS so the kernel stops asking.
    /// `no-open` (or `open`) when the kernel offers no passthrough.
    Auto,
    /// Open is answered once with ENOSYS; the kernel then never asks again and keeps the page
    /// cache: the fastest small-file and warm reads.
    NoOpen,
    /// Large files are opened with FUSE passthrough to their verified backing file (native
    /// speed from the first read), small ones with FOPEN_KEEP_CACHE; one round trip per open.
    Passthrough,
    /// Plain opens with FOPEN_KEEP_CACHE; reads go through the daemon.
    Open,
}

impl std::str::FromStr for OpenMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(OpenMode::Auto),
            "no-open" => Ok(OpenMode::NoOpen),
            "passthrough" => Ok(OpenMode::Passthrough),
            "open" => Ok(OpenMode::Open),
            _ => Err(format!("{s:?} is not one of auto, no-open, passthrough, open")),
        }
    }
}

/// The fuser `Filesystem` over a `CasFs`.
pub struct FuseAdapter {
    fs: Arc<CasFs>,
    rt: tokio::runtime::Handle,
    mode: OpenMode,
    no_opendir: bool,
    /// The kernel understands ENOSYS for open (`auto` may stop answering opens).
    can_stop_opens: bool,
    pass: Arc<Passthrough>,
    /// Per-operation counter and histogram, looked up once (no locking or allocation per
    /// request).
    op_metrics: Vec<(&'static str, Arc<std::sync::atomic::AtomicU64>, Arc<crate::metrics::Histogram>)>,
}

/// The operations whose counts and latencies are recorded.
const TIMED_OPS: [&str; 9] =
    ["lookup", "getattr", "readlink", "open", "read", "opendir", "readdir", "readdirplus", "getxattr"];

fn errno(e: &Error) -> Errno {
    Errno::from_i32(e.errno())
}

impl FuseAdapter {
    /// An adapter that runs fetches on `rt`.
    pub fn new(fs: Arc<CasFs>, rt: tokio::runtime::Handle, mode: OpenMode) -> Self {
        let m = fs.fetcher().metrics().clone();
        let op_metrics = TIMED_OPS
            .iter()
            .map(|op| {
                (
                    *op,
                    m.counter(&format!("casfs_fuse_ops_total{{op=\"{op}\"}}")),
                    m.histogram(&format!("casfs_fuse_op_seconds{{op=\"{op}\"}}")),
                )
            })
            .collect();
        FuseAdapter { fs, rt, mode, no_opendir: false, can_stop_opens: false, pass: Arc::default(), op_metrics }
    }

    fn timed(&self, op: &'static str) -> OpTimer {
        let hist = match self.op_metrics.iter().find(|(name, _, _)| *name == op) {
            Some((_, count, hist)) => {
                count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                hist.clone()
            }
            None => {
                let m = self.fs.fetcher().metrics();
                m.add(&format!("casfs_fuse_ops_total{{op=\"{op}\"}}"), 1);
                m.histogram(&format!("casfs_fuse_op_seconds{{op=\"{op}\"}}"))
            }
        };
        OpTimer { hist, start: Instant::now() }
    }
}

/// Observes an operation's latency when dropped (after its reply).
struct OpTimer {
    hist: Arc<crate::metrics::Histogram>,
    start: Instant,
}

impl Drop for OpTimer {
    fn drop(&mut self) {
        self.hist.observe(self.start.elapsed());
    }
}

fn name_str(name: &OsStr) -> Option<&str> {
    name.to_str()
}

impl Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let mut granted = Vec::new();
        let mut refused = Vec::new();
        let mut want = |config: &mut KernelConfig, flags: InitFlags, name: &'static str| -> bool {
            let ok = config.add_capabilities(flags).is_ok();
            if ok {
                granted.push(name)
            } else {
                refused.push(name)
            }
            ok
        };
        want(config, InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO, "readdirplus_auto");
        want(config, InitFlags::FUSE_CACHE_SYMLINKS, "cache_symlinks");
        want(config, InitFlags::FUSE_PARALLEL_DIROPS, "parallel_dirops");
        self.can_stop_opens = want(config, InitFlags::FUSE_NO_OPEN_SUPPORT, "no_open");
        // Directories are never opened, whatever the file mode: the kernel then keeps their
        // listings cached by itself and saves a round trip per directory open.
        self.no_opendir = want(config, InitFlags::FUSE_NO_OPENDIR_SUPPORT, "no_opendir");
        if matches!(self.mode, OpenMode::Auto | OpenMode::Passthrough) {
            // Depth 1 lets overlayfs stack on this mount while files pass through.
            let granted =
                want(config, InitFlags::FUSE_PASSTHROUGH, "passthrough") && config.set_max_stack_depth(1).is_ok();
            if !granted {
                self.mode = if self.mode == OpenMode::Auto { OpenMode::NoOpen } else { OpenMode::Open };
            }
        }
        if self.mode == OpenMode::NoOpen && !self.can_stop_opens {
            self.mode = OpenMode::Open;
        }
        if let Err(max) = config.set_max_readahead(1 << 20) {
            let _ = config.set_max_readahead(max);
        }
        let _ = config.set_max_background(64);
        tracing::info!(mode = ?self.mode, granted = ?granted, refused = ?refused, "FUSE connection initialised");
        let m = self.fs.fetcher().metrics();
        m.add(&format!("casfs_fuse_open_mode{{mode=\"{:?}\"}}", self.mode), 1);
        // Counters exist from the start, so "none yet" reads as 0, never as absent.
        m.counter("casfs_fuse_passthrough_opens_total");
        m.counter("casfs_fuse_opens_stopped_total");
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let t = self.timed("lookup");
        let Some(name) = name_str(name).map(str::to_string) else {
            return reply.error(Errno::ENOENT);
        };
        match self.fs.lookup_now(parent.0, &name) {
            Some(Ok(a)) => reply.entry(&TTL, &file_attr_static(&self.fs, &a), Generation(0)),
            Some(Err(e)) => reply.error(errno(&e)),
            None => {
                let fs = self.fs.clone();
                self.rt.spawn(async move {
                    let _t = t;
                    match fs.lookup(parent.0, &name).await {
                        Ok(a) => reply.entry(&TTL, &file_attr_static(&fs, &a), Generation(0)),
                        Err(e) => reply.error(errno(&e)),
                    }
                });
            }
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let _t = self.timed("getattr");
        match self.fs.getattr(ino.0) {
            Ok(a) => reply.attr(&TTL, &file_attr_static(&self.fs, &a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let _t = self.timed("readlink");
        match self.fs.readlink(ino.0) {
            Ok(t) => reply.data(t.as_bytes()),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let t = self.timed("open");
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY || flags.0 & libc::O_TRUNC != 0 {
            return reply.error(Errno::EROFS);
        }
        let auto = self.mode == OpenMode::Auto;
        match self.mode {
            OpenMode::NoOpen => return reply.error(Errno::ENOSYS),
            _ if auto && self.pass.stopped() => return reply.error(Errno::ENOSYS),
            OpenMode::Open => {
                return match self.fs.getattr(ino.0) {
                    Ok(_) => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
                    Err(e) => reply.error(errno(&e)),
                }
            }
            OpenMode::Auto | OpenMode::Passthrough => {}
        }
        let small = match self.fs.getattr(ino.0) {
            // Made-up files have no backing file: they are served from memory.
            Ok(a) => a.size <= PASSTHROUGH_MIN || self.fs.file_digest(ino.0).is_err(),
            Err(e) => return reply.error(errno(&e)),
        };
        if small {
            if auto && self.can_stop_opens && self.pass.small_open() >= NO_OPEN_AFTER {
                self.pass.stop("small files dominate", self.fs.fetcher().metrics());
            }
            return reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE);
        }
        let stop_on_refusal = auto && self.can_stop_opens;
        match self.fs.backing_now(ino.0) {
            Ok(Some(file)) => self.pass.reply(ino.0, &file, reply, stop_on_refusal, self.fs.fetcher().metrics()),
            Ok(None) => {
                let fs = self.fs.clone();
                let pass = self.pass.clone();
                self.rt.spawn(async move {
                    let _t = t;
                    match fs.fetch_backing(ino.0).await {
                        Ok(file) => pass.reply(ino.0, &file, reply, stop_on_refusal, fs.fetcher().metrics()),
                        Err(e) => reply.error(errno(&e)),
                    }
                });
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let t = self.timed("read");
        if offset == 0 {
            self.fs.note_read(ino.0);
        }
        match self.fs.read_now(ino.0, offset, size) {
            Some(Ok(data)) => reply.data(&data),
            Some(Err(e)) => reply.error(errno(&e)),
            None => {
                let fs = self.fs.clone();
                self.rt.spawn(async move {
                    let _t = t;
                    let res = match fs.load_file(ino.0).await.map(|()| fs.read_mem(ino.0, offset, size)) {
                        Ok(Some(data)) => Ok(data),
                        // The bytes are on disk now; read them off the runtime's threads.
                        Ok(None) => tokio::task::spawn_blocking(move || {
                            fs.read_now(ino.0, offset, size)
                                .unwrap_or_else(|| Err(Error::Internal("fetched blob left the cache at once".into())))
                        })
                        .await
                        .unwrap_or_else(|e| Err(Error::Internal(format!("read task: {e}")))),
                        Err(e) => Err(e),
                    };
                    match res {
                        Ok(data) => reply.data(&data),
                        Err(e) => reply.error(errno(&e)),
                    }
                });
            }
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if fh.0 != 0 {
            self.pass.release(fh.0);
        }
        reply.ok();
    }

    /// No ioctls: overlayfs asks for inode flags (FS_IOC_GETFLAGS) when it copies a folder
    /// up; ENOTTY is the ordinary "not supported" answer, without a log line each time.
    #[allow(clippy::too_many_arguments)]
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY);
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        // Nothing to flush on a read-only mount; ENOSYS makes the kernel stop sending
        // FLUSH on every close (a round trip per file otherwise).
        reply.error(Errno::ENOSYS);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let _t = self.timed("opendir");
        if self.no_opendir {
            return reply.error(Errno::ENOSYS);
        }
        match self.fs.getattr(ino.0) {
            Ok(a) if a.kind == Kind::Dir => {
                reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR)
            }
            Ok(_) => reply.error(Errno::ENOTDIR),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let t = self.timed("readdir");
        let fill = move |fs: &CasFs, dir: &Listing, reply: &mut ReplyDirectory| -> Result<(), Error> {
            for (next, name, a) in fs.list(ino.0, dir, offset)? {
                let kind = match a.kind {
                    Kind::Dir => FileType::Directory,
                    Kind::File => FileType::RegularFile,
                    Kind::Symlink => FileType::Symlink,
                };
                if reply.add(INodeNo(a.ino), next, kind, &name) {
                    break;
                }
            }
            Ok(())
        };
        match self.fs.listing_now(ino.0) {
            Ok(Some(dir)) => {
                if offset == 0 {
                    self.fs.listed(ino.0, &dir);
                }
                match fill(&self.fs, &dir, &mut reply) {
                    Ok(()) => reply.ok(),
                    Err(e) => reply.error(errno(&e)),
                }
            }
            Ok(None) => {
                let fs = self.fs.clone();
                self.rt.spawn(async move {
                    let _t = t;
                    match fs.listing(ino.0).await.and_then(|dir| fill(&fs, &dir, &mut reply)) {
                        Ok(()) => reply.ok(),
                        Err(e) => reply.error(errno(&e)),
                    }
                });
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdirplus(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        let t = self.timed("readdirplus");
        let fill = move |fs: &CasFs, dir: &Listing, reply: &mut ReplyDirectoryPlus| {
            let mut i = offset;
            loop {
                let added_full = if i < 2 {
                    let x = if i == 0 { ino.0 } else { fs.parent_of(ino.0) };
                    let a = Attr { ino: x, kind: Kind::Dir, size: 0, perm: 0o555 };
                    reply.add(
                        INodeNo(x),
                        i + 1,
                        if i == 0 { "." } else { ".." },
                        &TTL,
                        &file_attr_static(fs, &a),
                        Generation(0),
                    )
                } else {
                    // Each entry handed to the kernel counts as a lookup; undo it if it did not fit.
                    let Some((name, a)) = fs.list_plus_entry(ino.0, dir, (i - 2) as usize) else {
                        break;
                    };
                    let full = reply.add(INodeNo(a.ino), i + 1, &name, &TTL, &file_attr_static(fs, &a), Generation(0));
                    if full {
                        fs.forget(a.ino, 1);
                    }
                    full
                };
                if added_full {
                    break;
                }
                i += 1;
            }
        };
        match self.fs.listing_now(ino.0) {
            Ok(Some(dir)) => {
                if offset == 0 {
                    self.fs.listed(ino.0, &dir);
                }
                fill(&self.fs, &dir, &mut reply);
                reply.ok();
            }
            Ok(None) => {
                let fs = self.fs.clone();
                self.rt.spawn(async move {
                    let _t = t;
                    match fs.listing(ino.0).await {
                        Ok(dir) => {
                            fill(&fs, &dir, &mut reply);
                            reply.ok();
                        }
                        Err(e) => reply.error(errno(&e)),
                    }
                });
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(0, 0, 0, self.fs.inode_count() as u64, 0, 64 * 1024, 255, 64 * 1024);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let _t = self.timed("getxattr");
        // Security labels and ACLs are not kept: say "not supported" rather than "absent",
        // so ls and friends remember that for the whole mount (coreutils caches ENOTSUP per
        // device) instead of asking once per file.
        if name.as_encoded_bytes().starts_with(b"security.") || name.as_encoded_bytes().starts_with(b"system.") {
            return reply.error(Errno::from_i32(libc::EOPNOTSUPP));
        }
        let value = match name_str(name).map(|n| self.fs.getxattr(ino.0, n)) {
            Some(Ok(Some(v))) => v,
            Some(Ok(None)) | None => return reply.error(Errno::NO_XATTR),
            Some(Err(e)) => return reply.error(errno(&e)),
        };
        xattr_reply(&value, size, reply);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.fs.listxattr(ino.0) {
            Ok(v) => xattr_reply(&v, size, reply),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, mask: fuser::AccessFlags, reply: ReplyEmpty) {
        if mask.bits() & libc::W_OK != 0 {
            reply.error(Errno::EROFS)
        } else {
            reply.ok()
        }
    }

    fn setxattr(&self, _r: &Request, _i: INodeNo, _n: &OsStr, _v: &[u8], _f: i32, _p: u32, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }
}

fn file_attr_static(fs: &CasFs, a: &Attr) -> FileAttr {
    let cfg = fs.config();
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: cfg.mtime,
        mtime: cfg.mtime,
        ctime: cfg.mtime,
        crtime: cfg.mtime,
        kind: match a.kind {
            Kind::Dir => FileType::Directory,
            Kind::File => FileType::RegularFile,
            Kind::Symlink => FileType::Symlink,
        },
        perm: if a.kind == Kind::Dir { cfg.dir_perm } else { a.perm },
        nlink: 1,
        uid: cfg.uid,
        gid: cfg.gid,
        rdev: 0,
        blksize: 64 * 1024,
        flags: 0,
    }
}

fn xattr_reply(value: &[u8], size: u32, reply: ReplyXattr) {
    if size == 0 {
        reply.size(value.len() as u32);
    } else if (size as usize) < value.len() {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(value);
    }
}
