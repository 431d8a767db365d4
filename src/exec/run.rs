//! Executes one Action: cache lookup, prepare the input root (lazy FUSE mount with an
//! overlayfs writable layer), run sandboxed, capture and upload outputs, report and cache.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use prost::Message;

use super::capture::{capture, Captured, Source, Unchanged};
use super::sandbox::{self, Exit, Job, SandboxConfig};
use super::spec::{ActionSpec, Limits};
use crate::cas::{DiskStore, SharedActionCache, SharedCas};
use crate::digest::Digest;
use crate::error::{Error, IoContext, Result};
use crate::fs::{FetchConfig, Fetcher, MountConfig, MountGuard, Remotes, Root};
use crate::metrics::Metrics;
use crate::proto::{reapi, rpc};

/// How the input root is made available to the command.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Materialize {
    /// `lazy` when FUSE and overlayfs work here, else `eager`.
    Auto,
    /// Mounted with casfs's FUSE filesystem, an overlayfs layer on top for writes: only what
    /// the command reads is fetched.
    Lazy,
    /// Everything fetched first and laid out with hard links from the blob cache.
    Eager,
}

impl Materialize {
    /// The mode `Auto` stands for on this host.
    pub fn resolve(self) -> Materialize {
        if self != Materialize::Auto {
            return self;
        }
        let fuse = std::fs::OpenOptions::new().read(true).write(true).open("/dev/fuse").is_ok();
        let overlay = std::fs::read_to_string("/proc/filesystems").map(|f| f.contains("overlay")).unwrap_or(false);
        if fuse && overlay && unsafe { libc::geteuid() } == 0 {
            Materialize::Lazy
        } else {
            Materialize::Eager
        }
    }
}

/// Executor settings.
#[derive(Clone, Debug)]
pub struct ExecConfig {
    /// How input roots are provided.
    pub materialize: Materialize,
    /// Scratch space for mounts, overlays and captured stdout/stderr.
    pub work_dir: PathBuf,
    /// Timeout bounds.
    pub limits: Limits,
    /// Confinement.
    pub sandbox: SandboxConfig,
    /// Name reported in ExecutedActionMetadata.worker.
    pub worker_name: String,
    /// Fetch deadline and caches of input mounts.
    pub fetch: FetchConfig,
    /// Write successful results to the action cache. Off when a scheduler that writes the
    /// cache itself (BuildGrid, on lease completion) would do the same write again.
    pub cache_results: bool,
}

/// The result of one execution, as Execute reports it.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// The ActionResult (present even on timeout: stdout, stderr and outputs attached).
    pub result: reapi::ActionResult,
    /// OK, DEADLINE_EXCEEDED, or an infrastructure failure.
    pub status: rpc::Status,
    /// Served from the action cache.
    pub cached: bool,
}

/// Per-execution options.
#[derive(Clone, Copy, Debug)]
pub struct RunOptions {
    /// Do not serve the result from the action cache (it is still written there).
    pub skip_cache_lookup: bool,
    /// When the action entered the queue (reported as `queued_timestamp`).
    pub queued: SystemTime,
}

/// Runs Actions against one CAS and action cache.
pub struct Executor {
    cas: SharedCas,
    ac: SharedActionCache,
    cache: Arc<DiskStore>,
    cfg: ExecConfig,
    metrics: Arc<Metrics>,
    lock: std::sync::Mutex<Option<std::fs::File>>,
}

fn now() -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp::from(SystemTime::now()))
}

fn ok_status() -> rpc::Status {
    rpc::Status { code: 0, message: String::new(), details: vec![] }
}

/// Scratch folder, overlay and FUSE mount of one action; all undone on drop (also when the
/// executor unwinds from a panic).
struct Workspace {
    dir: PathBuf,
    overlay: Option<PathBuf>,
    mount: Option<MountGuard>,
    eager: Option<Arc<super::materialize::Materialized>>,
    closed: bool,
}

impl Workspace {
    /// Undoes everything off the async workers: unmounting waits on the FUSE session, whose
    /// requests are served by those same workers.
    async fn close(mut self) {
        let _ = tokio::task::spawn_blocking(move || self.cleanup()).await;
    }

    fn cleanup(&mut self) {
        if self.closed {
            return;
        }
        self.closed = true;
        if let Some(o) = self.overlay.take() {
            if let Err(e) = crate::fs::mount::detach(&o) {
                tracing::error!(path = %o.display(), error = %e, "could not unmount the overlay");
            }
        }
        drop(self.mount.take());
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "could not remove the scratch folder");
        }
    }
}

impl Drop for Workspace {
    /// On cancellation or unwinding: clean up here, letting the runtime move its other tasks
    /// (FUSE replies among them) to another worker while this one blocks.
    fn drop(&mut self) {
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(|| self.cleanup())
            }
            _ => self.cleanup(),
        }
    }
}

/// Files left as the input root had them keep their digest: the overlay's upper layer holds
/// exactly what the command created or changed.
struct OverlayUnchanged<'a> {
    upper: &'a Path,
    fetcher: &'a Fetcher,
    input_root: Digest,
}

impl Unchanged for OverlayUnchanged<'_> {
    fn digest(&self, rel: &Path) -> Option<Digest> {
        if std::fs::symlink_metadata(self.upper.join(rel)).is_ok() {
            return None;
        }
        let mut dir = self.fetcher.cached_dir(&self.input_root)?;
        let parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
        let (last, dirs) = parts.split_last()?;
        for p in dirs {
            let d = dir.dirs.iter().find(|e| &e.name == p)?.digest;
            dir = self.fetcher.cached_dir(&d)?;
        }
        dir.files.iter().find(|f| &f.name == last).map(|f| f.digest)
    }
}

impl Executor {
    /// An executor over `cas` and `ac`, caching input blobs in `cache`.
    pub fn new(
        cas: SharedCas,
        ac: SharedActionCache,
        cache: Arc<DiskStore>,
        cfg: ExecConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        Executor { cas, ac, cache, cfg, metrics, lock: Default::default() }
    }

    /// Removes what a killed executor left in its work folder: overlays and mounts are
    /// detached, scratch folders deleted; the processes of any dead executor's actions are
    /// killed and their cgroups removed. Call once at start.
    ///
    /// Executors sharing a work folder hold a shared lock on it; the cleaning happens only
    /// when no other live executor holds one, so it never removes a running action's folder.
    pub fn clean_stale(&self) -> Result<usize> {
        use std::os::fd::AsRawFd;
        super::sandbox::reap_orphans();
        let dir = &self.cfg.work_dir;
        std::fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
        let lock = std::fs::File::create(dir.join(".lock")).ctx(|| format!("locking {}", dir.display()))?;
        let alone = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
        let n = if alone { self.remove_stale()? } else { 0 };
        // Shared from now on: other executors may use the folder, none may clean it.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_SH) } != 0 {
            return Err(Error::io(format!("locking {}", dir.display()), std::io::Error::last_os_error()));
        }
        *self.lock.lock().unwrap_or_else(|e| e.into_inner()) = Some(lock);
        Ok(n)
    }

    fn remove_stale(&self) -> Result<usize> {
        let Ok(rd) = std::fs::read_dir(&self.cfg.work_dir) else { return Ok(0) };
        let mut n = 0;
        for e in rd.flatten() {
            let p = e.path();
            if !e.file_name().to_string_lossy().starts_with("action-") {
                continue;
            }
            // A thread of the dead executor may still wait on its own FUSE mount (and keep
            // the process from dying): abort that connection first.
            crate::fs::mount::abort_fuse(&p.join("lower"));
            for sub in ["root", "lower"] {
                if crate::fs::mount::is_mounted(&p.join(sub)) {
                    crate::fs::mount::detach(&p.join(sub))?;
                }
            }
            std::fs::remove_dir_all(&p).ctx(|| format!("removing stale {}", p.display()))?;
            n += 1;
        }
        if n > 0 {
            tracing::warn!(count = n, dir = %self.cfg.work_dir.display(), "removed scratch folders of a previous executor");
        }
        Ok(n)
    }

    /// The metrics registry (cache hits, executions, failures, and the input mounts' fetch
    /// counters and latencies).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    async fn message<M: Message + Default>(&self, d: Digest) -> Result<M> {
        let bytes = match self.cas.read(&d).await {
            Err(Error::MissingBlob(m)) => return Err(Error::MissingInputs(vec![m])),
            other => other?,
        };
        M::decode(bytes.as_ref()).map_err(|e| Error::InvalidArgument(format!("{d} does not decode: {e}")))
    }

    /// Executes an Action. Errors before the command starts (missing or invalid Action,
    /// Command or inputs) are returned as `Err`; everything after is in the Outcome.
    pub async fn execute(&self, action_digest: Digest, skip_cache_lookup: bool) -> Result<Outcome> {
        self.execute_with(action_digest, RunOptions { skip_cache_lookup, queued: SystemTime::now() }).await
    }

    /// [`Executor::execute`] for an action that waited in a queue since `opts.queued`.
    pub async fn execute_with(&self, action_digest: Digest, opts: RunOptions) -> Result<Outcome> {
        let mut meta = reapi::ExecutedActionMetadata {
            worker: self.cfg.worker_name.clone(),
            queued_timestamp: Some(prost_types::Timestamp::from(opts.queued)),
            worker_start_timestamp: now(),
            ..Default::default()
        };
        let action: reapi::Action = self.message(action_digest).await?;
        if !opts.skip_cache_lookup && !action.do_not_cache {
            let found = crate::cas::verified_action_result(self.cas.as_ref(), self.ac.as_ref(), &action_digest).await;
            if let Some(r) = found? {
                self.metrics.add("casfs_exec_cache_hits_total", 1);
                return Ok(Outcome { result: r, status: ok_status(), cached: true });
            }
        }
        let command_digest = action
            .command_digest
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument("action has no command_digest".into()))
            .and_then(|d| Ok(Digest::try_from(d)?))?;
        let command: reapi::Command = self.message(command_digest).await?;
        let spec = ActionSpec::new(action_digest, &action, command_digest, &command, &self.cfg.limits)?;
        self.metrics.add("casfs_exec_actions_total", 1);

        meta.input_fetch_start_timestamp = now();
        // The lazy mount would only notice a missing root at the first lookup.
        if let Some(m) = self.cas.find_missing(&[spec.input_root]).await?.first() {
            return Err(Error::MissingInputs(vec![*m]));
        }
        let ws = self.prepare(&spec).await?;
        let out = self.run_prepared(&ws, spec, action_digest, meta).await;
        ws.close().await;
        out
    }

    /// Runs the command in a prepared workspace, captures and uploads its outputs.
    async fn run_prepared(
        &self,
        ws: &Workspace,
        spec: ActionSpec,
        action_digest: Digest,
        mut meta: reapi::ExecutedActionMetadata,
    ) -> Result<Outcome> {
        meta.input_fetch_completed_timestamp = now();
        let root = ws.dir.join("root");
        let argv = {
            let (root, spec) = (root.clone(), spec.clone());
            tokio::task::spawn_blocking(move || resolve_argv0(&root, &spec))
                .await
                .map_err(|e| Error::Internal(format!("argv task: {e}")))??
        };
        let (stdout, stderr) = (ws.dir.join("stdout"), ws.dir.join("stderr"));
        meta.execution_start_timestamp = now();
        let job = Job {
            root: &root,
            cwd: format!("/{}", spec.working_directory),
            argv: &argv,
            env: &spec.env,
            stdout: &stdout,
            stderr: &stderr,
            network: spec.network,
            run_as_root: spec.run_as_root,
            timeout: spec.timeout,
        };
        let done = sandbox::run(&self.cfg.sandbox, job).await?;
        meta.auxiliary_metadata.push(done.to_any());
        let exit = done.exit;
        meta.execution_completed_timestamp = now();

        // A fetch that failed under the command is the infrastructure's fault, not the
        // command's: report it as such and cache nothing (rule 2).
        if let Some(m) = &ws.mount {
            let f = m.fs().fetcher().failures();
            if !f.missing.is_empty() {
                return Err(Error::MissingInputs(f.missing));
            }
            if f.count > 0 {
                return Err(Error::Unavailable(format!("{} input fetches failed while the action ran", f.count)));
            }
        }

        meta.output_upload_start_timestamp = now();
        let captured = {
            let fetcher = ws.mount.as_ref().map(|m| m.fs().fetcher().clone());
            let eager = ws.eager.clone();
            let upper = ws.dir.join("upper");
            let root = root.clone();
            let spec2 = spec.clone();
            tokio::task::spawn_blocking(move || -> Result<Captured> {
                match (&fetcher, &eager) {
                    (Some(f), _) => {
                        let u = OverlayUnchanged { upper: &upper, fetcher: f, input_root: spec2.input_root };
                        capture(&root, &spec2.working_directory, &spec2.outputs, &u)
                    }
                    (None, Some(m)) => capture(&root, &spec2.working_directory, &spec2.outputs, m.as_ref()),
                    (None, None) => {
                        capture(&root, &spec2.working_directory, &spec2.outputs, &super::capture::HashEverything)
                    }
                }
            })
            .await
            .map_err(|e| Error::Internal(format!("capture task: {e}")))??
        };
        let mut blobs = captured.blobs.clone();
        let so = crate::digest::hash_file(&stdout).ctx(|| "hashing stdout".into())?;
        let se = crate::digest::hash_file(&stderr).ctx(|| "hashing stderr".into())?;
        blobs.insert(so, Source::File(stdout.clone()));
        blobs.insert(se, Source::File(stderr.clone()));
        self.upload(blobs).await?;
        meta.output_upload_completed_timestamp = now();
        meta.worker_completed_timestamp = now();

        let (exit_code, status) = match exit {
            Exit::Code(c) => (c, ok_status()),
            Exit::TimedOut => (
                -1,
                rpc::Status {
                    code: tonic::Code::DeadlineExceeded as i32,
                    message: format!("the action ran longer than its {:?} timeout and was killed", spec.timeout),
                    details: vec![],
                },
            ),
        };
        let result = reapi::ActionResult {
            output_files: captured.files,
            output_file_symlinks: captured.file_symlinks,
            output_symlinks: captured.symlinks,
            output_directories: captured.dirs,
            output_directory_symlinks: captured.dir_symlinks,
            exit_code,
            stdout_digest: Some(so.to_proto()),
            stderr_digest: Some(se.to_proto()),
            execution_metadata: Some(meta),
            ..Default::default()
        };
        if self.cfg.cache_results && exit_code == 0 && status.code == 0 && !spec.do_not_cache {
            self.ac.update_action_result(&action_digest, &result).await?;
        }
        tracing::info!(action = %action_digest, exit_code, hashed = captured.hashed_bytes, reused = captured.reused_files, "action done");
        Ok(Outcome { result, status, cached: false })
    }

    async fn prepare(&self, spec: &ActionSpec) -> Result<Workspace> {
        std::fs::create_dir_all(&self.cfg.work_dir).ctx(|| format!("creating {}", self.cfg.work_dir.display()))?;
        let dir = tempfile::Builder::new()
            .prefix("action-")
            .tempdir_in(&self.cfg.work_dir)
            .ctx(|| format!("creating a scratch folder in {}", self.cfg.work_dir.display()))?
            .keep();
        let mut ws = Workspace { dir: dir.clone(), overlay: None, mount: None, eager: None, closed: false };
        for sub in ["lower", "upper", "work", "root"] {
            std::fs::create_dir(dir.join(sub)).ctx(|| format!("creating {sub}"))?;
        }
        if self.cfg.materialize.resolve() == Materialize::Eager {
            let m = super::materialize::materialize(&self.cas, &self.cache, spec.input_root, &dir.join("root")).await?;
            ws.eager = Some(Arc::new(m));
            give_dirs(&dir.join("root"), self.cfg.sandbox.ids())?;
            create_output_parents(&dir.join("root"), spec, Some(self.cfg.sandbox.ids()))?;
            return Ok(ws);
        }
        let mut cfg = MountConfig::new(dir.join("lower"));
        cfg.fetch = self.cfg.fetch.clone();
        cfg.fetch.batch_siblings = true;
        let run_as = Some(self.cfg.sandbox.ids());
        if let Some((uid, gid)) = run_as {
            // The command's user owns the tree it sees, as on a Buildbarn or BuildBox worker
            // (the root folder of the overlay is its upper layer's).
            (cfg.fs.uid, cfg.fs.gid, cfg.fs.dir_perm) = (uid, gid, 0o755);
            std::os::unix::fs::lchown(dir.join("upper"), Some(uid), Some(gid)).ctx(|| "chown upper".into())?;
        }
        let remotes = Remotes::single(self.cas.clone(), None);
        let cache = self.cache.clone();
        let metrics = self.metrics.clone();
        let spec = spec.clone();
        // Mounting and the first lookups through the mount are answered by FUSE handlers
        // running on the async workers: never block one of them waiting for that.
        tokio::task::spawn_blocking(move || -> Result<Workspace> {
            // Fetch counters and latencies land in the executor's registry, so a worker's
            // /metrics shows what its actions read from the CAS.
            ws.mount = Some(crate::fs::mount(Root::Digest(spec.input_root), remotes, cache, cfg, metrics)?);
            let opts = format!(
                "lowerdir={},upperdir={},workdir={}",
                dir.join("lower").display(),
                dir.join("upper").display(),
                dir.join("work").display()
            );
            let root = dir.join("root");
            mount_overlay(&root, &opts)?;
            ws.overlay = Some(root.clone());
            create_output_parents(&root, &spec, run_as)?;
            Ok(ws)
        })
        .await
        .map_err(|e| Error::Internal(format!("prepare task: {e}")))?
    }

    async fn upload(&self, blobs: std::collections::HashMap<Digest, Source>) -> Result<()> {
        let digests: Vec<Digest> = blobs.keys().copied().collect();
        let missing = self.cas.find_missing(&digests).await?;
        let mut small = Vec::new();
        for d in missing {
            match &blobs[&d] {
                Source::Bytes(b) => small.push((d, b.clone())),
                Source::File(p) if d.size() <= 1 << 20 => {
                    let data = std::fs::read(p).ctx(|| format!("reading output {}", p.display()))?;
                    small.push((d, data.into()));
                }
                Source::File(p) => self.cas.write_file(&d, p).await?,
            }
        }
        for (_, r) in self.cas.write_many(small).await? {
            r?;
        }
        Ok(())
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

/// argv[0] as given when it has a slash; otherwise looked up in the Command's own PATH
/// (entries relative to the working directory), inside the prepared root (rule 4); a Command
/// without PATH is looked up in `/usr/local/bin:/usr/bin:/bin`.
fn resolve_argv0(root: &Path, spec: &ActionSpec) -> Result<Vec<String>> {
    let mut argv = spec.argv.clone();
    if argv[0].contains('/') {
        return Ok(argv);
    }
    // Without a PATH of its own the command gets the usual system one for this lookup only
    // (Pants runs a bare `env -0` with no environment at all); its environment is untouched.
    let path =
        spec.env.iter().find(|(k, _)| k == "PATH").map(|(_, v)| v.as_str()).unwrap_or("/usr/local/bin:/usr/bin:/bin");
    for entry in path.split(':').filter(|e| !e.is_empty()) {
        let in_root =
            if entry.starts_with('/') { entry.to_string() } else { format!("/{}/{entry}", spec.working_directory) };
        let candidate = format!("{}/{}", in_root.trim_end_matches('/'), argv[0]);
        // Host tool folders are bound in at run time, so look there too.
        let host = Path::new(&candidate);
        if root.join(candidate.trim_start_matches('/')).is_file() || host.is_file() {
            argv[0] = candidate;
            return Ok(argv);
        }
    }
    Err(Error::InvalidArgument(format!("{:?} not found in the command's PATH {path:?}", argv[0])))
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
        let Some(parent) = Path::new(&o.path).parent() else { continue };
        // Folder by folder, never through a symlink of the (hostile) input root: one
        // pointing at a host path would have us create host folders as root.
        let mut p = root.to_path_buf();
        for c in Path::new(&spec.working_directory).join(parent).components() {
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
