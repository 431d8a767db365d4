//! Executes one decoded Action: prepare its input root (lazy FUSE mount with an overlayfs
//! writable layer, or eager), run it sandboxed, capture and upload its outputs, and report an
//! ActionResult. The executor knows nothing of the action cache (see `cached.rs`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use prost::Message;

use super::capture::{capture_with, Captured, Source};
use super::profile::ProfileConfig;
use super::profiling::{Session, Start};
use super::sandbox::{self, Exit, Job, SandboxConfig};
use super::spec::{ActionSpec, Limits};
use super::workspace::{Materialize, Setup, Workspace};
use crate::cache::LocalCache;
use crate::cas::{SharedActionCache, SharedCas};
use crate::digest::Digest;
use crate::error::{rpc_ok, rpc_status, Error, IoContext, Result};
use crate::fs::FetchConfig;
use crate::metrics::Metrics;
use crate::proto::{reapi, rpc};

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
}

/// What one execution produced.
#[derive(Clone, Debug)]
pub struct Executed {
    /// The ActionResult (present even on timeout: stdout, stderr and outputs attached).
    pub result: reapi::ActionResult,
    /// OK, or DEADLINE_EXCEEDED when the command ran out of time.
    pub status: rpc::Status,
}

/// Loads and decodes the Action `digest` from `cas` (absent: MISSING, as rule 2 wants).
pub async fn load_action(cas: &SharedCas, digest: Digest) -> Result<reapi::Action> {
    message(cas, digest).await
}

async fn message<M: Message + Default>(cas: &SharedCas, d: Digest) -> Result<M> {
    // Read whole: bound what a client can make the executor hold (an Action or Command is
    // far smaller; argv past the kernel's limit could not run anyway).
    if d.size() > MAX_MESSAGE_BYTES {
        return Err(Error::InvalidArgument(format!("{d} is too large for an Action or Command message")));
    }
    let bytes = match cas.read(&d).await {
        Err(Error::MissingBlob(m)) => return Err(Error::MissingInputs(vec![m])),
        other => other?,
    };
    M::decode(bytes.as_ref()).map_err(|e| Error::InvalidArgument(format!("{d} does not decode: {e}")))
}

/// Runs Actions whose inputs are in one CAS, outputs going to it.
pub struct Executor {
    cas: SharedCas,
    cache: Arc<LocalCache>,
    cfg: ExecConfig,
    metrics: Arc<Metrics>,
    lock: std::sync::Mutex<Option<std::fs::File>>,
    profiles: ProfileConfig,
    profile_ac: std::sync::OnceLock<SharedActionCache>,
}

/// Largest Action or Command the executor reads.
const MAX_MESSAGE_BYTES: u64 = 16 << 20;

fn now() -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp::from(SystemTime::now()))
}

impl Executor {
    /// An executor reading inputs from `cas` through `cache`, writing outputs to `cas`.
    pub fn new(cas: SharedCas, cache: Arc<LocalCache>, cfg: ExecConfig, metrics: Arc<Metrics>) -> Self {
        Executor {
            cas,
            cache,
            cfg,
            metrics,
            lock: Default::default(),
            profiles: ProfileConfig::default(),
            profile_ac: Default::default(),
        }
    }

    /// This executor with access profiles configured so (on by default; they take effect
    /// once an action cache is shared with [`Executor::share_profiles`]).
    pub fn with_profiles(mut self, cfg: ProfileConfig) -> Self {
        self.profiles = cfg;
        self
    }

    /// Stores and finds access profiles in `ac` (the action cache of the executor's CAS);
    /// the first call wins. [`super::CachedExecutor::new`] calls this.
    pub fn share_profiles(&self, ac: SharedActionCache) {
        let _ = self.profile_ac.set(ac);
    }

    /// The CAS inputs come from and outputs go to.
    pub fn cas(&self) -> &SharedCas {
        &self.cas
    }

    /// Removes what a killed executor left in its work folder: overlays and mounts are
    /// detached, scratch folders deleted; the processes of any dead executor's actions are
    /// killed and their cgroups removed. Call once at start.
    ///
    /// Executors sharing a work folder hold a shared lock on it; the cleaning happens only
    /// when no other live executor holds one, so it never removes a running action's folder.
    pub fn clean_stale(&self) -> Result<usize> {
        super::sandbox::reap_orphans();
        let dir = &self.cfg.work_dir;
        std::fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
        let lock = std::fs::File::create(dir.join(".lock")).ctx(|| format!("locking {}", dir.display()))?;
        let alone = lock.try_lock().is_ok();
        let n = if alone { self.remove_stale()? } else { 0 };
        // Shared from now on: other executors may use the folder, none may clean it. (An
        // executor that takes the exclusive lock in between finds nothing of ours to clean:
        // no action has started yet.)
        if alone {
            lock.unlock().ctx(|| format!("unlocking {}", dir.display()))?;
        }
        lock.lock_shared().ctx(|| format!("locking {}", dir.display()))?;
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

    /// Executes `action` (whose digest is `action_digest`), queued since `queued`. Errors
    /// before the command starts (missing or invalid Command or inputs) are returned as
    /// `Err`; everything after is in the result.
    pub async fn execute(&self, action_digest: Digest, action: &reapi::Action, queued: SystemTime) -> Result<Executed> {
        let mut meta = reapi::ExecutedActionMetadata {
            worker: self.cfg.worker_name.clone(),
            queued_timestamp: Some(prost_types::Timestamp::from(queued)),
            worker_start_timestamp: now(),
            ..Default::default()
        };
        let command_digest = action
            .command_digest
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument("action has no command_digest".into()))
            .and_then(|d| Ok(Digest::from_proto_with(action_digest.function(), d)?))?;
        let command: reapi::Command = message(&self.cas, command_digest).await?;
        let spec = ActionSpec::new(action_digest, action, command_digest, &command, &self.cfg.limits)?;
        self.metrics.add("casfs_exec_actions_total", 1);

        meta.input_fetch_start_timestamp = now();
        // The lazy mount would only notice a missing root at the first lookup.
        if let Some(m) = self.cas.find_missing(&[spec.input_root]).await?.first() {
            return Err(Error::MissingInputs(vec![*m]));
        }
        let setup = Setup {
            work_dir: &self.cfg.work_dir,
            materialize: self.cfg.materialize,
            cas: &self.cas,
            cache: &self.cache,
            fetch: &self.cfg.fetch,
            metrics: &self.metrics,
            run_as: Some(self.cfg.sandbox.ids()),
        };
        let ws = Workspace::prepare(setup, &spec).await?;
        let session = match (ws.fs(), self.profile_ac.get()) {
            (Some(fs), Some(ac)) if self.profiles.enabled => Some(Session::start(Start {
                cfg: self.profiles,
                cas: &self.cas,
                ac,
                metrics: &self.metrics,
                fs,
                key: super::profile::key(&command, action),
                root: spec.input_root,
            })),
            _ => None,
        };
        let out = self.run_prepared(&ws, spec, action_digest, meta).await;
        if let Some(s) = session {
            s.finish(out.is_ok()).await;
        }
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
    ) -> Result<Executed> {
        meta.input_fetch_completed_timestamp = now();
        let root = ws.dir().join("root");
        let (stdout, stderr) = (ws.dir().join("stdout"), ws.dir().join("stderr"));
        meta.execution_start_timestamp = now();
        let job = Job {
            root: &root,
            cwd: format!("/{}", spec.working_directory),
            argv: &spec.argv,
            env: &spec.env,
            stdout: &stdout,
            stderr: &stderr,
            network: spec.network,
            run_as_root: spec.run_as_root,
            timeout: spec.timeout,
            hermetic: spec.hermetic,
        };
        let done = sandbox::run(&self.cfg.sandbox, job).await?;
        meta.auxiliary_metadata.push(done.to_any());
        let exit = done.exit;
        meta.execution_completed_timestamp = now();

        // A fetch that failed under the command is the infrastructure's fault, not the
        // command's: report it as such and cache nothing (rule 2).
        if let Some(fetcher) = ws.fetcher() {
            let f = fetcher.failures();
            if !f.missing.is_empty() {
                return Err(Error::MissingInputs(f.missing));
            }
            if f.count > 0 {
                return Err(Error::Unavailable(format!("{} input fetches failed while the action ran", f.count)));
            }
        }

        meta.output_upload_start_timestamp = now();
        let captured = {
            let unchanged = ws.unchanged(spec.input_root);
            let (root, spec) = (root.clone(), spec.clone());
            tokio::task::spawn_blocking(move || -> Result<Captured> {
                capture_with(
                    spec.action.function(),
                    spec.output_directory_format,
                    &root,
                    &spec.outputs,
                    unchanged.as_ref(),
                )
            })
            .await
            .map_err(|e| Error::Internal(format!("capture task: {e}")))??
        };
        let mut blobs = captured.blobs.clone();
        let f = spec.action.function();
        let so = crate::digest::hash_file_with(f, &stdout).ctx(|| "hashing stdout".into())?;
        let se = crate::digest::hash_file_with(f, &stderr).ctx(|| "hashing stderr".into())?;
        blobs.insert(so, Source::File(stdout.clone()));
        blobs.insert(se, Source::File(stderr.clone()));
        self.upload(blobs).await?;
        meta.output_upload_completed_timestamp = now();
        meta.worker_completed_timestamp = now();

        let (exit_code, status) = match exit {
            Exit::Code(c) => (c, rpc_ok()),
            Exit::TimedOut => (
                -1,
                rpc_status(
                    tonic::Code::DeadlineExceeded,
                    format!("the action ran longer than its {:?} timeout and was killed", spec.timeout),
                ),
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
        tracing::info!(action = %action_digest, exit_code, hashed = captured.hashed_bytes, reused = captured.reused_files, "action done");
        Ok(Executed { result, status })
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
