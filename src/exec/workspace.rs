//! One action's scratch folder and input root: a lazy FUSE mount with an overlayfs layer on
//! top for writes, or an eager hard-linked copy; everything undone on drop.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::capture::Unchanged;
use super::materialize::Materialized;
use super::spec::ActionSpec;
use crate::cache::LocalCache;
use crate::cas::SharedCas;
use crate::digest::Digest;
use crate::error::{Error, IoContext, Result};
use crate::fs::{FetchConfig, Fetcher, MountConfig, MountGuard, Remote, Root};
use crate::metrics::Metrics;

/// How the input root is made available to the command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Materialize {
    /// `lazy` when FUSE and overlayfs work here, else `eager`.
    Auto,
    /// Mounted with casfs's FUSE filesystem, an overlayfs layer on top for writes: only what
    /// the command reads is fetched.
    Lazy,
    /// Everything fetched first and laid out with hard links from the blob cache.
    Eager,
}

impl std::str::FromStr for Materialize {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Materialize::Auto),
            "lazy" => Ok(Materialize::Lazy),
            "eager" => Ok(Materialize::Eager),
            _ => Err(format!("{s:?} is not one of auto, lazy, eager")),
        }
    }
}

impl Materialize {
    /// The mode `Auto` stands for on this host.
    pub fn resolve(self) -> Materialize {
        if self != Materialize::Auto {
            return self;
        }
        let fuse = std::fs::OpenOptions::new().read(true).write(true).open("/dev/fuse").is_ok();
        let overlay = std::fs::read_to_string("/proc/filesystems").map(|f| f.contains("overlay")).unwrap_or(false);
        // SAFETY: geteuid only reads the calling process's credentials.
        if fuse && overlay && unsafe { libc::geteuid() } == 0 {
            Materialize::Lazy
        } else {
            Materialize::Eager
        }
    }
}

/// What backs the input root.
enum Inputs {
    /// The FUSE mount under `lower/`, and the overlay at `root/` once it is mounted.
    Lazy { mount: MountGuard, overlay: Option<PathBuf> },
    /// A hard-linked copy at `root/`.
    Eager(Arc<Materialized>),
}

/// Scratch folder and input root of one action; all undone on drop (also when the executor
/// unwinds from a panic or drops the execution).
pub(crate) struct Workspace {
    dir: PathBuf,
    inputs: Option<Inputs>,
    closed: bool,
}

/// What [`Workspace::prepare`] needs from the executor.
pub(crate) struct Setup<'a> {
    pub work_dir: &'a Path,
    pub materialize: Materialize,
    pub cas: &'a SharedCas,
    pub cache: &'a Arc<LocalCache>,
    pub fetch: &'a FetchConfig,
    pub metrics: &'a Arc<Metrics>,
    /// The command's user, who owns the tree it sees (`None`: the executor's own).
    pub run_as: Option<(u32, u32)>,
}

impl Workspace {
    /// Makes the scratch folder and the input root of `spec`, with the parents of every
    /// output created (rule 8).
    pub(crate) async fn prepare(s: Setup<'_>, spec: &ActionSpec) -> Result<Workspace> {
        std::fs::create_dir_all(s.work_dir).ctx(|| format!("creating {}", s.work_dir.display()))?;
        let dir = tempfile::Builder::new()
            .prefix("action-")
            .tempdir_in(s.work_dir)
            .ctx(|| format!("creating a scratch folder in {}", s.work_dir.display()))?
            .keep();
        let mut ws = Workspace { dir: dir.clone(), inputs: None, closed: false };
        for sub in ["lower", "upper", "work", "root"] {
            std::fs::create_dir(dir.join(sub)).ctx(|| format!("creating {sub}"))?;
        }
        let root = dir.join("root");
        if s.materialize.resolve() == Materialize::Eager {
            let m = super::materialize::materialize(s.cas, s.cache, spec.input_root, &root).await?;
            ws.inputs = Some(Inputs::Eager(Arc::new(m)));
            if let Some(ids) = s.run_as {
                give_dirs(&root, ids)?;
            }
            create_output_parents(&root, spec, s.run_as)?;
            return Ok(ws);
        }
        let mut cfg = MountConfig::new(dir.join("lower"));
        cfg.fetch = s.fetch.clone();
        cfg.fetch.batch_siblings = true;
        if let Some((uid, gid)) = s.run_as {
            // The command's user owns the tree it sees, as on a Buildbarn or BuildBox worker
            // (the root folder of the overlay is its upper layer's).
            (cfg.fs.uid, cfg.fs.gid, cfg.fs.dir_perm) = (uid, gid, 0o755);
            std::os::unix::fs::lchown(dir.join("upper"), Some(uid), Some(gid)).ctx(|| "chown upper".into())?;
        }
        let mount_root = Root::Digest(spec.input_root, Remote::new(s.cas.clone(), None));
        let (cache, metrics, spec, run_as) = (s.cache.clone(), s.metrics.clone(), spec.clone(), s.run_as);
        // Mounting and the first lookups through the mount are answered by FUSE handlers
        // running on the async workers: never block one of them waiting for that.
        tokio::task::spawn_blocking(move || -> Result<Workspace> {
            // Fetch counters and latencies land in the executor's registry, so a worker's
            // /metrics shows what its actions read from the CAS.
            let mount = crate::fs::mount(mount_root, cache, cfg, metrics)?;
            ws.inputs = Some(Inputs::Lazy { mount, overlay: None });
            let opts = format!(
                "lowerdir={},upperdir={},workdir={}",
                dir.join("lower").display(),
                dir.join("upper").display(),
                dir.join("work").display()
            );
            mount_overlay(&root, &opts)?;
            if let Some(Inputs::Lazy { overlay, .. }) = &mut ws.inputs {
                *overlay = Some(root.clone());
            }
            create_output_parents(&root, &spec, run_as)?;
            Ok(ws)
        })
        .await
        .map_err(|e| Error::Internal(format!("prepare task: {e}")))?
    }

    /// The scratch folder (`root/` is the command's view, `stdout`/`stderr` land here).
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// The input mount's filesystem (lazy inputs only).
    pub(crate) fn fs(&self) -> Option<&Arc<crate::fs::CasFs>> {
        match &self.inputs {
            Some(Inputs::Lazy { mount, .. }) => Some(mount.fs()),
            _ => None,
        }
    }

    /// The input mount's fetcher (lazy inputs only).
    pub(crate) fn fetcher(&self) -> Option<&Arc<Fetcher>> {
        match &self.inputs {
            Some(Inputs::Lazy { mount, .. }) => Some(mount.fs().fetcher()),
            _ => None,
        }
    }

    /// What tells an output left as the input root had it (it keeps its digest, unhashed).
    pub(crate) fn unchanged(&self, input_root: Digest) -> Box<dyn Unchanged + Send> {
        match &self.inputs {
            Some(Inputs::Lazy { mount, .. }) => Box::new(OverlayUnchanged {
                upper: self.dir.join("upper"),
                fetcher: mount.fs().fetcher().clone(),
                input_root,
            }),
            Some(Inputs::Eager(m)) => Box::new(EagerUnchanged(m.clone())),
            None => Box::new(super::capture::HashEverything),
        }
    }

    /// Undoes everything off the async workers: unmounting waits on the FUSE session, whose
    /// requests are served by those same workers.
    pub(crate) async fn close(mut self) {
        let _ = tokio::task::spawn_blocking(move || self.cleanup()).await;
    }

    fn cleanup(&mut self) {
        if self.closed {
            return;
        }
        self.closed = true;
        if let Some(Inputs::Lazy { mount, overlay }) = self.inputs.take() {
            if let Some(o) = overlay {
                if let Err(e) = crate::fs::mount::detach(&o) {
                    tracing::error!(path = %o.display(), error = %e, "could not unmount the overlay");
                }
            }
            drop(mount);
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "could not remove the scratch folder");
        }
    }
}

impl Drop for Workspace {
    /// On cancellation or unwinding: clean up here, letting the runtime move its other tasks
    /// (FUSE replies among them) to another worker while this one blocks.
    fn drop(&mut self) {
        super::blocking(|| self.cleanup())
    }
}

/// Files left as the input root had them keep their digest: the overlay's upper layer holds
/// exactly what the command created or changed.
struct OverlayUnchanged {
    upper: PathBuf,
    fetcher: Arc<Fetcher>,
    input_root: Digest,
}

impl Unchanged for OverlayUnchanged {
    fn digest(&self, rel: &Path) -> Option<Digest> {
        if std::fs::symlink_metadata(self.upper.join(rel)).is_ok() {
            return None;
        }
        let mut dir = self.fetcher.cached_dir(&self.input_root)?;
        let parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
        let (last, dirs) = parts.split_last()?;
        for p in dirs {
            let d = dir.dirs.iter().find(|e| e.name == p)?.digest;
            dir = self.fetcher.cached_dir(&d)?;
        }
        dir.files.iter().find(|f| f.name == last).map(|f| f.digest)
    }
}

/// Hard links the command left alone keep their digest.
struct EagerUnchanged(Arc<Materialized>);

impl Unchanged for EagerUnchanged {
    fn digest(&self, rel: &Path) -> Option<Digest> {
        self.0.digest(rel)
    }
}

/// Mounts the writable layer. `volatile` (Linux 5.10+) skips the sync of the upper layer's
/// whole filesystem at unmount: the layer is scratch, thrown away with the action, and that
/// sync costs seconds when the disk has unrelated dirty data. Older kernels get the plain
/// mount.
fn mount_overlay(target: &Path, opts: &str) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let t = std::ffi::CString::new(target.as_os_str().as_bytes())
        .map_err(|_| Error::InvalidArgument("NUL in path".into()))?;
    let mount = |opts: &str| -> Result<i32> {
        let o = std::ffi::CString::new(opts).map_err(|_| Error::InvalidArgument("NUL in overlay options".into()))?;
        // SAFETY: every pointer is a NUL-terminated string that outlives the call.
        Ok(unsafe {
            libc::mount(c"overlay".as_ptr(), t.as_ptr(), c"overlay".as_ptr(), 0, o.as_ptr() as *const libc::c_void)
        })
    };
    let mut rc = mount(&format!("{opts},volatile"))?;
    if rc != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
        rc = mount(opts)?;
    }
    if rc != 0 {
        return Err(Error::io(
            format!("mounting the overlay at {}", target.display()),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Hands every folder under `root` to `ids` (uid, gid), so a command running as that user
/// can create files anywhere in its input root (files stay read-only, as the cache has them).
fn give_dirs(root: &Path, ids: (u32, u32)) -> Result<()> {
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        std::os::unix::fs::lchown(&d, Some(ids.0), Some(ids.1)).ctx(|| format!("chown {}", d.display()))?;
        for e in std::fs::read_dir(&d).ctx(|| format!("listing {}", d.display()))? {
            let e = e.ctx(|| format!("listing {}", d.display()))?;
            if e.file_type().ctx(|| format!("stat {}", e.path().display()))?.is_dir() {
                stack.push(e.path());
            }
        }
    }
    Ok(())
}

/// Checks the working directory exists and creates the parents of every output (rule 8),
/// owned by the command's user when it runs as another one.
fn create_output_parents(root: &Path, spec: &ActionSpec, run_as: Option<(u32, u32)>) -> Result<()> {
    let wd = root.join(&spec.working_directory);
    if !std::fs::metadata(&wd).map(|m| m.is_dir()).unwrap_or(false) {
        return Err(Error::InvalidArgument(format!(
            "working directory {:?} is not a directory of the input root",
            spec.working_directory
        )));
    }
    for o in &spec.outputs {
        let Some(parent) = Path::new(&o.in_root).parent() else { continue };
        // Folder by folder, never through a symlink of the (hostile) input root: one
        // pointing at a host path would have us create host folders as root.
        let mut p = root.to_path_buf();
        for c in parent.components() {
            p.push(c);
            use std::os::unix::fs::MetadataExt;
            let uid = match std::fs::symlink_metadata(&p) {
                Ok(m) if m.is_dir() => m.uid(),
                Ok(_) => break,
                Err(_) => {
                    std::fs::create_dir(&p).ctx(|| format!("creating the parent of output {}", o.path))?;
                    0
                }
            };
            if let Some((u, g)) = run_as.filter(|(u, _)| *u != uid) {
                std::os::unix::fs::lchown(&p, Some(u), Some(g)).ctx(|| format!("chown {}", p.display()))?;
            }
        }
    }
    Ok(())
}
