//! `casfs worker`: attach the executor to a Remote Workers API scheduler (BuildGrid) and run
//! its leases until stopped.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use sha2::Digest as _;

use casfs::cas::GrpcStore;
use casfs::error::{Error, IoContext, Result};
use casfs::exec::Executor;
use casfs::metrics::Metrics;
use casfs::worker::BotsClient;
use casfs::worker::{Bot, Shutdown, StopLevel, WorkerConfig};

use super::exec_args::{hostname, ExecArgs};
use super::{parse_duration, usage, CmdResult, ConnArgs};

/// Options of `casfs worker`.
#[derive(Args)]
pub struct WorkerArgs {
    /// Scheduler URL (its Bots service): grpc://HOST:PORT, http://HOST:PORT, grpcs://…, unix:PATH.
    #[arg(long, env = "CASFS_SCHEDULER")]
    pub scheduler: String,
    /// CAS URL the scheduler's actions live in [default: the scheduler's URL].
    #[arg(long, env = "CASFS_CAS")]
    pub cas: Option<String>,
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Platform property KEY=VALUE offered to the scheduler (repeatable) [default:
    /// OSFamily=linux and this machine's ISA].
    #[arg(long = "platform", env = "CASFS_PLATFORM", value_delimiter = ',')]
    pub platform: Vec<String>,
    /// Leases run at once.
    #[arg(long, env = "CASFS_CONCURRENCY", default_value_t = 1)]
    pub concurrency: usize,
    /// This worker's stable id; a restarted worker with the same id takes over its old
    /// session at once [default: casfs-HOSTNAME-HASH, HASH naming the work folder].
    #[arg(long, env = "CASFS_BOT_ID")]
    pub bot_id: Option<String>,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9103).
    #[arg(long, env = "CASFS_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Deadline of a long-polling call to the scheduler.
    #[arg(long, env = "CASFS_LONG_POLL", default_value = "60s", value_parser = parse_duration)]
    pub long_poll: Duration,
    /// Longest time between two calls while actions run (shortened to fit the session's
    /// keepalive).
    #[arg(long, env = "CASFS_HEARTBEAT", default_value = "30s", value_parser = parse_duration)]
    pub heartbeat: Duration,
    #[command(flatten)]
    pub cache: super::CacheArgs,
    #[command(flatten)]
    pub exec: ExecArgs,
}

/// The counters and gauges a worker exports at 0 before anything happened.
const WORKER_COUNTERS: [&str; 14] = [
    "casfs_worker_leases_taken_total",
    "casfs_worker_leases_completed_total",
    "casfs_worker_leases_failed_total",
    "casfs_worker_leases_cancelled_total",
    "casfs_worker_leases_refused_total",
    "casfs_worker_leases_running",
    "casfs_worker_connected",
    "casfs_worker_sessions_created_total",
    "casfs_worker_sessions_lost_total",
    "casfs_worker_update_errors_total",
    "casfs_exec_cache_hits_total",
    "casfs_fetch_blobs_total",
    "casfs_fetch_dirs_total",
    "casfs_fetch_bytes_total",
];

/// Runs the worker until SIGTERM/SIGINT (drain) or a second one (abandon).
pub async fn run(args: WorkerArgs) -> CmdResult {
    if args.concurrency == 0 {
        return Err(usage("--concurrency must be at least 1"));
    }
    let mut platform = Vec::new();
    for p in &args.platform {
        match p.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => platform.push((k.trim().to_string(), v.trim().to_string())),
            _ => return Err(usage(format!("--platform {p:?} is not KEY=VALUE"))),
        }
    }
    if platform.is_empty() {
        platform = casfs::worker::default_platform();
    }
    let work_dir = args.exec.work_dir.clone().unwrap_or_else(|| std::env::temp_dir().join("casfs-worker"));
    let bot_id = args.bot_id.clone().unwrap_or_else(|| default_bot_id(&work_dir));
    if bot_id.trim().is_empty() {
        return Err(usage("--bot-id must not be empty"));
    }
    // Two workers with one bot id would keep closing each other's session.
    let _bot_lock = lock_bot_id(&work_dir, &bot_id)?;

    let cas_url = args.cas.clone().unwrap_or_else(|| args.scheduler.clone());
    let cas = Arc::new(GrpcStore::new(&args.conn.config(&cas_url)?)?);
    let bots = BotsClient::new(&args.conn.config(&args.scheduler)?)?;
    // BuildGrid looks results up and writes them itself: the bare executor runs leases.
    let mut cfg = args.exec.config(bot_id.clone(), work_dir);
    cfg.fetch = args.cache.fetch_config();
    let metrics = Metrics::new();
    let cache = args.cache.open(&metrics)?;
    // Every counter a scrape reads exists from the start: "none yet" is 0, never absent.
    for name in WORKER_COUNTERS {
        metrics.counter(name);
    }
    if let Some(addr) = &args.metrics_listen {
        let l = tokio::net::TcpListener::bind(addr).await.map_err(|e| Error::io(format!("binding {addr}"), e))?;
        let bound = l.local_addr().map_err(|e| Error::io("metrics listener", e))?;
        eprintln!("casfs: metrics on http://{bound}/metrics");
        tokio::spawn(casfs::metrics::serve(l, metrics.clone()));
    }
    let exec = Arc::new(Executor::new(cas.clone(), cache, cfg, metrics));
    let stale = exec.clean_stale()?;
    if stale > 0 {
        eprintln!("casfs: cleared {stale} stale action folders (and their mounts) of a previous run");
    }

    let mut wcfg = WorkerConfig::new(bot_id.clone(), args.concurrency);
    wcfg.instance_name = args.conn.instance_name.clone();
    wcfg.platform = platform;
    wcfg.long_poll = args.long_poll;
    wcfg.heartbeat = args.heartbeat;
    let (stop, shutdown) = Shutdown::channel();
    tokio::spawn(signals(stop));
    eprintln!(
        "casfs: worker {bot_id}: scheduler {}, CAS {cas_url}, {} lease(s) at once, {:?} input roots",
        args.scheduler,
        args.concurrency,
        args.exec.materialize.resolve()
    );
    Bot::new(wcfg, bots, exec, cas).run(shutdown).await?;
    eprintln!("casfs: worker {bot_id} stopped");
    Ok(())
}

/// First SIGTERM/SIGINT: drain. Second: abandon.
async fn signals(stop: tokio::sync::watch::Sender<StopLevel>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    for level in [StopLevel::Drain, StopLevel::Abandon] {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        match level {
            StopLevel::Drain => {
                tracing::warn!("stopping: no new leases; running ones finish (signal again to abandon them)")
            }
            _ => tracing::warn!("abandoning running leases"),
        }
        let _ = stop.send(level);
    }
}

/// `casfs-HOSTNAME-HASH`, HASH naming the work folder: stable across restarts, distinct
/// for workers on one host with their own folders.
fn default_bot_id(work_dir: &Path) -> String {
    let abs = std::fs::canonicalize(work_dir).unwrap_or_else(|_| work_dir.to_path_buf());
    let h = sha2::Sha256::digest(abs.as_os_str().as_encoded_bytes());
    format!("casfs-{}-{}", hostname(), &hex::encode(h)[..8])
}

/// Holds an exclusive lock named after the bot id in the work folder for the worker's life.
fn lock_bot_id(work_dir: &Path, bot_id: &str) -> Result<std::fs::File> {
    std::fs::create_dir_all(work_dir).ctx(|| format!("creating {}", work_dir.display()))?;
    let h = hex::encode(sha2::Sha256::digest(bot_id.as_bytes()));
    let path = work_dir.join(format!(".bot-{}.lock", &h[..16]));
    let f = std::fs::File::create(&path).ctx(|| format!("creating {}", path.display()))?;
    if f.try_lock().is_err() {
        return Err(Error::FailedPrecondition(format!(
            "another worker with bot id {bot_id:?} runs on {}; give each worker its own --work-dir or --bot-id",
            work_dir.display()
        )));
    }
    Ok(f)
}
