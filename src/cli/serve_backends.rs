//! What `casfs serve` serves: one backend for every instance name (the default), named
//! instances (`--instance NAME[=OPTIONS]`), or an executor in front of a remote store
//! (`--cas URL [--ac URL]`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use casfs::cache::LocalCache;
use casfs::cas::{DiskStore, GrpcStore, SharedActionCache, SharedCas};
use casfs::exec::{CachedExecutor, Executor};
use casfs::metrics::Metrics;
use casfs::server::scheduler::{Scheduler, SchedulerConfig};
use casfs::server::{AcWrites, Backend};

use super::exec_args::hostname;
use super::serve_args::{InstanceSpec, ServeArgs};
use super::{usage, CmdResult};

/// The backends to serve, and each one's metrics registry with its instance label
/// (`None`: unlabelled, for the one backend serving every name).
pub struct Served {
    /// `(instance name, backend, metrics)`; one entry with `None` when instances are not named.
    pub backends: Vec<(Option<String>, Backend, Arc<Metrics>)>,
}

/// A folder name for an instance (`/` and the empty name made safe).
fn folder_name(name: &str) -> String {
    if name.is_empty() {
        "_default".into()
    } else {
        name.replace('/', "_")
    }
}

fn open_disk(args: &ServeArgs, dir: &Path, metrics: &Metrics) -> CmdResult<Arc<DiskStore>> {
    let quarantined = metrics.counter("casfs_storage_quarantined_blobs_total");
    let store = Arc::new(
        DiskStore::open(dir, args.storage_size)?
            .with_min_lifetime(args.min_blob_lifetime)
            .with_metrics(metrics)
            .count_quarantined_in(quarantined)
            .trust_what_it_verified(metrics.counter("casfs_storage_trusted_reads_total")),
    );
    tracing::info!(storage = %dir.display(), blobs = store.blob_count(), bytes = store.total_bytes(), "storage opened");
    Ok(store)
}

fn logged(cas: SharedCas, log: Option<&PathBuf>) -> CmdResult<SharedCas> {
    Ok(match log {
        Some(p) => Arc::new(casfs::cas::access_log::AccessLog::open(cas, p)?),
        None => cas,
    })
}

/// The scheduler of an executing backend.
fn scheduler(args: &ServeArgs, exec: Arc<Executor>, ac: SharedActionCache) -> CmdResult<Arc<Scheduler>> {
    exec.clean_stale()?;
    let mut sc = SchedulerConfig {
        max_queued: args.max_queued_actions,
        retention: args.operation_retention,
        abandon_after: (!args.abandon_after.is_zero()).then_some(args.abandon_after),
        ..Default::default()
    };
    if let Some(n) = args.max_concurrent_actions {
        sc.max_concurrent = n.max(1);
    }
    tracing::info!(max_concurrent = sc.max_concurrent, materialize = ?args.exec.materialize.resolve(), "execution enabled");
    Ok(Scheduler::new(Arc::new(CachedExecutor::new(exec, ac)), sc))
}

/// One backend on local disk: blobs in `blobs` (the store that also holds the action cache
/// unless `ac` is another one), executing in `work_dir` when `execute`.
struct Local<'a> {
    blobs: Arc<DiskStore>,
    ac: Arc<DiskStore>,
    execute: bool,
    ac_writes: AcWrites,
    access_log: Option<&'a PathBuf>,
    work_dir: PathBuf,
}

fn local_backend(args: &ServeArgs, l: Local<'_>, metrics: &Arc<Metrics>) -> CmdResult<Backend> {
    let cas = logged(l.blobs.clone(), l.access_log)?;
    let mut backend = Backend::new(cas.clone(), l.ac.clone());
    backend.ac_writes = l.ac_writes;
    if l.execute {
        let mut cfg = args.exec.config(format!("casfs-serve@{}", hostname()), l.work_dir.clone());
        cfg.work_dir = l.work_dir;
        // The store is also the executor's blob cache: inputs are already local.
        let cache = casfs::cache::LocalCache::over_store(l.blobs.clone(), metrics)?;
        let exec = Arc::new(Executor::new(cas, cache, cfg, metrics.clone()).with_profiles(args.exec.profiles()));
        backend.execution = Some(scheduler(args, exec, l.ac)?);
    }
    Ok(backend)
}

/// The work folder of an executor whose default is `default`: `--work-dir`, with a folder
/// per instance when instances are named (each executor cleans its own at start).
fn work_dir(args: &ServeArgs, default: PathBuf, instance: Option<&str>) -> PathBuf {
    match (&args.exec.work_dir, instance) {
        (Some(w), Some(name)) => w.join(format!("instance-{}", folder_name(name))),
        (Some(w), None) => w.clone(),
        (None, _) => default,
    }
}

/// Opens the stores and executors `args` ask for; each backend counts into its own registry.
pub fn backends(args: &ServeArgs, metrics: &Arc<Metrics>) -> CmdResult<Served> {
    let mut served = open_backends(args, metrics)?;
    for (_, backend, m) in &mut served.backends {
        backend.metrics = m.clone();
    }
    Ok(served)
}

fn open_backends(args: &ServeArgs, metrics: &Arc<Metrics>) -> CmdResult<Served> {
    if let Some(url) = &args.cas {
        if args.instances.is_empty() {
            let up = Upstream {
                instance: &args.conn.instance_name,
                execute: !args.no_execution,
                ac_writes: args.ac_writes,
                access_log: args.access_log.as_ref(),
                work_dir: work_dir(args, args.storage.join("exec"), None),
            };
            let backend = split_backend(args, url, up, CacheShare { folder: None, of: 1 }, metrics)?;
            return Ok(Served { backends: vec![(None, backend, metrics.clone())] });
        }
        let executing = args.instances.iter().filter(|s| s.execution.unwrap_or(!args.no_execution)).count();
        let mut out = Vec::new();
        for spec in &args.instances {
            if spec.storage.is_some() || spec.shared_cas {
                return Err(usage(format!(
                    "--instance {:?}: storage= and shared-cas are for local storage, not with --cas",
                    spec.name
                )));
            }
            let m = Metrics::new();
            let up = Upstream {
                instance: spec.upstream.as_deref().unwrap_or(&spec.name),
                execute: spec.execution.unwrap_or(!args.no_execution),
                ac_writes: spec.ac_writes.unwrap_or(args.ac_writes),
                access_log: spec.access_log.as_ref().or(args.access_log.as_ref()),
                work_dir: work_dir(
                    args,
                    args.storage.join("instances").join(folder_name(&spec.name)).join("exec"),
                    Some(&spec.name),
                ),
            };
            let cache = CacheShare { folder: Some(folder_name(&spec.name)), of: executing };
            let backend = split_backend(args, url, up, cache, &m)?;
            out.push((Some(spec.name.clone()), backend, m));
        }
        return Ok(Served { backends: out });
    }
    if args.ac.is_some() {
        return Err(usage("--ac needs --cas (the store whose action cache it replaces)"));
    }
    if args.instances.is_empty() {
        let store = open_disk(args, &args.storage, metrics)?;
        let l = Local {
            blobs: store.clone(),
            ac: store,
            execute: !args.no_execution,
            ac_writes: args.ac_writes,
            access_log: args.access_log.as_ref(),
            work_dir: work_dir(args, args.storage.join("exec"), None),
        };
        let backend = local_backend(args, l, metrics)?;
        return Ok(Served { backends: vec![(None, backend, metrics.clone())] });
    }
    let mut shared: Option<Arc<DiskStore>> = None;
    let mut out = Vec::new();
    for spec in &args.instances {
        let m = Metrics::new();
        let dir = spec.storage.clone().unwrap_or_else(|| args.storage.join("instances").join(folder_name(&spec.name)));
        let own = open_disk(args, &dir, &m)?;
        let blobs = if spec.shared_cas {
            match &shared {
                Some(s) => s.clone(),
                None => shared.insert(open_disk(args, &args.storage, metrics)?).clone(),
            }
        } else {
            own.clone()
        };
        let l = Local {
            blobs,
            ac: own,
            execute: spec.execution.unwrap_or(!args.no_execution),
            ac_writes: spec.ac_writes.unwrap_or(args.ac_writes),
            access_log: spec.access_log.as_ref().or(args.access_log.as_ref()),
            work_dir: work_dir(args, dir.join("exec"), Some(&spec.name)),
        };
        let backend = local_backend(args, l, &m)?;
        tracing::info!(instance = %spec.name, storage = %dir.display(), shared_cas = spec.shared_cas, execution = backend.execution.is_some(), "instance configured");
        out.push((Some(spec.name.clone()), backend, m));
    }
    Ok(Served { backends: out })
}

/// What one backend in front of a remote store serves.
struct Upstream<'a> {
    /// The upstream instance name.
    instance: &'a str,
    execute: bool,
    ac_writes: AcWrites,
    access_log: Option<&'a PathBuf>,
    work_dir: PathBuf,
}

/// Which local blob cache an executor in front of a remote store uses: `--cache-dir` itself,
/// or (for a named instance) its folder `instances/NAME` there with a `1/of` share of the
/// memory budget. Instances never share one: a blob read for one instance is not at hand
/// for an action of another that the upstream would refuse it to.
struct CacheShare {
    folder: Option<String>,
    of: usize,
}

impl CacheShare {
    fn open(&self, args: &ServeArgs, metrics: &Metrics) -> CmdResult<(Arc<LocalCache>, casfs::fs::FetchConfig)> {
        let Some(folder) = &self.folder else { return Ok((args.cache.open(metrics)?, args.cache.fetch_config())) };
        let budget = casfs::cache::MemoryBudget(args.cache.budget().0 / self.of.max(1) as u64);
        let dir = args.cache.cache_dir.join("instances").join(folder);
        let cfg = casfs::cache::CacheConfig::with_budget(&dir, args.cache.cache_size, budget);
        let fetch = casfs::fs::FetchConfig {
            dir_cache_bytes: budget.directories(),
            in_flight_bytes: budget.in_flight(),
            ..casfs::fs::FetchConfig::default()
        };
        Ok((LocalCache::open(&cfg, metrics)?, fetch))
    }
}

/// An executor (and proxy) in front of the store at `url`: inputs are fetched lazily through
/// the local blob cache, outputs and results go to the store (or `--ac`).
fn split_backend(
    args: &ServeArgs,
    url: &str,
    up: Upstream<'_>,
    cache: CacheShare,
    metrics: &Arc<Metrics>,
) -> CmdResult<Backend> {
    let config = |u: &str| {
        let mut cfg = args.conn.config(u)?;
        cfg.instance_name = up.instance.to_string();
        Ok::<_, casfs::Error>(cfg)
    };
    let store = Arc::new(GrpcStore::new(&config(url)?)?);
    let ac: SharedActionCache = match &args.ac {
        Some(ac_url) => Arc::new(GrpcStore::new(&config(ac_url)?)?),
        None => store.clone(),
    };
    let cas = logged(store.clone(), up.access_log)?;
    let mut backend = Backend::new(cas.clone(), ac.clone());
    backend.ac_writes = up.ac_writes;
    if up.execute {
        let (cache, fetch) = cache.open(args, metrics)?;
        let mut cfg = args.exec.config(format!("casfs-serve@{}", hostname()), up.work_dir.clone());
        cfg.work_dir = up.work_dir;
        cfg.fetch = fetch;
        let exec = Arc::new(Executor::new(cas, cache, cfg, metrics.clone()).with_profiles(args.exec.profiles()));
        backend.execution = Some(scheduler(args, exec, ac)?);
    }
    tracing::info!(cas = %url, ac = args.ac.as_deref().unwrap_or(url), instance = %up.instance, execution = backend.execution.is_some(), "serving in front of a remote store");
    Ok(backend)
}

/// The metrics page: each registry, labelled with its instance when instances are named.
pub fn metrics_page(served: &Served, server: &Arc<Metrics>) -> Arc<dyn Fn() -> String + Send + Sync> {
    let parts: Vec<(String, Arc<Metrics>)> = served
        .backends
        .iter()
        .filter_map(|(name, _, m)| name.as_ref().map(|n| (format!("instance=\"{n}\""), m.clone())))
        .collect();
    let server = server.clone();
    Arc::new(move || {
        let mut page = server.render();
        for (label, m) in &parts {
            page.push_str(&m.render_labelled(label));
        }
        page
    })
}

/// Refuses an `--instance` list naming one instance twice.
pub fn check_unique(specs: &[InstanceSpec]) -> CmdResult {
    for (i, s) in specs.iter().enumerate() {
        if specs[..i].iter().any(|o| o.name == s.name) {
            return Err(usage(format!("--instance {:?} is given twice", s.name)));
        }
    }
    Ok(())
}
