//! `casfs serve`: the embedded REAPI server on local disk.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use casfs::cas::DiskStore;
use casfs::error::Error;
use casfs::exec::Executor;
use casfs::metrics::Metrics;
use casfs::server::scheduler::{Scheduler, SchedulerConfig};
use casfs::server::{AcWrites, Backend, Bound, Listen};

use super::exec_args::{hostname, ExecArgs};
use super::signals::Shutdown;
use super::{default_storage, parse_duration, parse_size, usage, CmdResult};

#[derive(Args)]
pub struct ServeArgs {
    /// Address to listen on: HOST:PORT (port 0 picks one) or unix:PATH.
    #[arg(long, env = "CASFS_LISTEN", default_value = "127.0.0.1:8980")]
    listen: String,
    /// Folder holding blobs and action results (created if missing). A blob found corrupt
    /// when read is moved to its quarantine/ folder (the newest 16 kept) and counts as
    /// missing, so the next upload heals it.
    #[arg(long, env = "CASFS_STORAGE", default_value_os_t = default_storage())]
    storage: PathBuf,
    /// Bound on stored blob bytes, least recently used evicted first (e.g. 10G; 0 = none).
    #[arg(long, env = "CASFS_STORAGE_SIZE", default_value = "10G", value_parser = parse_size)]
    storage_size: u64,
    /// Allow a listen address other than loopback. Without --tls-client-ca or
    /// --auth-token-file anyone who reaches it may read, write and execute (logged as a
    /// warning).
    #[arg(long, env = "CASFS_ALLOW_REMOTE_CLIENTS")]
    allow_remote_clients: bool,
    /// Append one line per blob read or written (`read HASH/SIZE`) to this file.
    #[arg(long, env = "CASFS_ACCESS_LOG")]
    access_log: Option<PathBuf>,
    /// Serve over TLS with this PEM certificate chain (needs --tls-key).
    #[arg(long, env = "CASFS_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "CASFS_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require TLS client certificates signed by this PEM CA bundle (needs --tls-cert).
    #[arg(long, env = "CASFS_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Require `authorization: Bearer TOKEN` on every call, TOKEN read from this file.
    #[arg(long, env = "CASFS_AUTH_TOKEN_FILE")]
    auth_token_file: Option<PathBuf>,
    /// Serve storage only: no Execution service.
    #[arg(long, env = "CASFS_NO_EXECUTION")]
    no_execution: bool,
    /// Actions executing at once; more wait in a queue [default: number of cores].
    #[arg(long, env = "CASFS_MAX_CONCURRENT_ACTIONS")]
    max_concurrent_actions: Option<usize>,
    /// Actions allowed to wait in the queue before Execute answers RESOURCE_EXHAUSTED.
    #[arg(long, env = "CASFS_MAX_QUEUED_ACTIONS", default_value_t = 10_000)]
    max_queued_actions: usize,
    /// How long a finished operation can still be waited on.
    #[arg(long, env = "CASFS_OPERATION_RETENTION", default_value = "10m", value_parser = parse_duration)]
    operation_retention: Duration,
    /// Cancel an action once no client has watched its operation for this long (0 = never).
    #[arg(long, env = "CASFS_ABANDON_AFTER", default_value = "30s", value_parser = parse_duration)]
    abandon_after: Duration,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9102).
    #[arg(long, env = "CASFS_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// Abort an upload (DEADLINE_EXCEEDED, its temporary file removed) once its client has
    /// sent less than 64 KiB in this long.
    #[arg(long, env = "CASFS_UPLOAD_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    upload_idle_timeout: Duration,
    /// Who may write the action cache with UpdateActionResult: `all` clients (Bazel's
    /// --remote_upload_local_results) or `none` (only this server's executor records
    /// results; clients get PERMISSION_DENIED).
    #[arg(long, env = "CASFS_AC_WRITES", default_value = "all", value_parser = parse_ac_writes)]
    ac_writes: AcWrites,
    /// A blob the server reported present (FindMissingBlobs, an action-cache or Execute cache
    /// hit, a Remote Asset record) is not evicted for this long afterwards; an upload that
    /// would need it gone is refused (RESOURCE_EXHAUSTED) instead. 0 = plain LRU, where
    /// being asked about does not count as a use.
    #[arg(long, env = "CASFS_MIN_BLOB_LIFETIME", default_value = "10m", value_parser = parse_duration)]
    min_blob_lifetime: Duration,
    /// Let the Remote Asset Fetch service download URLs that start with this prefix itself
    /// (repeatable, e.g. https://mirror.example/; redirects must stay under an allowed
    /// prefix too). By default it downloads nothing and answers only from records clients
    /// pushed.
    #[arg(long = "asset-fetch", env = "CASFS_ASSET_FETCH", value_delimiter = ',')]
    asset_fetch: Vec<String>,
    /// Largest file the Remote Asset Fetch service downloads.
    #[arg(long, env = "CASFS_ASSET_MAX_SIZE", default_value = "4G", value_parser = super::parse_size)]
    asset_max_size: u64,
    /// Longest download of the Remote Asset Fetch service (a request may ask for less).
    #[arg(long, env = "CASFS_ASSET_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    asset_timeout: Duration,
    #[command(flatten)]
    exec: ExecArgs,
}

/// Runs the server until SIGINT or SIGTERM.
pub async fn serve(args: ServeArgs) -> CmdResult {
    let listen: Listen = match args.listen.parse() {
        Ok(l) => l,
        Err(e) => return Err(usage(e.to_string())),
    };
    if let Listen::Tcp(addr) = &listen {
        if !addr.ip().is_loopback() && !args.allow_remote_clients {
            return Err(usage(format!(
                "refusing to listen on {addr}: not loopback (pass --allow-remote-clients; there is no authentication)"
            )));
        }
        if !addr.ip().is_loopback() && args.tls_client_ca.is_none() && args.auth_token_file.is_none() {
            tracing::warn!(%addr, "listening beyond loopback without authentication (see --tls-client-ca, --auth-token-file)");
        }
    }
    let metrics = Metrics::new();
    let quarantined = metrics.counter("casfs_storage_quarantined_blobs_total");
    let store = Arc::new(
        DiskStore::open(&args.storage, args.storage_size)?
            .with_min_lifetime(args.min_blob_lifetime)
            .with_metrics(&metrics)
            .count_quarantined_in(quarantined),
    );
    tracing::info!(storage = %args.storage.display(), blobs = store.blob_count(), bytes = store.total_bytes(), "storage opened");
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => Some(casfs::server::TlsFiles {
            cert_pem: std::fs::read(c).map_err(|e| Error::io(format!("reading {}", c.display()), e))?,
            key_pem: std::fs::read(k).map_err(|e| Error::io(format!("reading {}", k.display()), e))?,
            client_ca_pem: match &args.tls_client_ca {
                Some(p) => Some(std::fs::read(p).map_err(|e| Error::io(format!("reading {}", p.display()), e))?),
                None => None,
            },
        }),
        _ => None,
    };
    let stop = Shutdown::install();
    let bound = Bound::bind(&listen).await?;
    let url = bound.url();
    let url = if tls.is_some() { url.replacen("grpc://", "grpcs://", 1) } else { url };
    println!("casfs: serving on {url}");
    let _ = std::io::stdout().flush();
    let cas: casfs::cas::SharedCas = match &args.access_log {
        Some(p) => Arc::new(casfs::cas::access_log::AccessLog::open(store.clone(), p)?),
        None => store.clone(),
    };
    let mut backend = Backend::new(cas.clone(), store.clone());
    if args.upload_idle_timeout.is_zero() {
        return Err(usage("--upload-idle-timeout must be more than 0"));
    }
    backend.upload_idle_timeout = args.upload_idle_timeout;
    backend.ac_writes = args.ac_writes;
    backend.asset_fetch = casfs::server::AssetFetch {
        allow: args.asset_fetch.iter().filter(|p| !p.is_empty()).cloned().collect(),
        max_bytes: args.asset_max_size,
        timeout: args.asset_timeout,
        ..Default::default()
    };
    if let Some(p) = backend.asset_fetch.allow.iter().find(|p| !p.starts_with("http://") && !p.starts_with("https://"))
    {
        return Err(usage(format!("--asset-fetch {p:?}: a prefix starts with http:// or https://")));
    }
    if let Some(p) = &args.auth_token_file {
        let token = std::fs::read_to_string(p).map_err(|e| Error::io(format!("reading {}", p.display()), e))?;
        if token.trim().is_empty() {
            return Err(usage(format!("{} holds no token", p.display())));
        }
        backend.auth_token = Some(token.trim().to_string());
    }
    if let Some(addr) = &args.metrics_listen {
        let l = tokio::net::TcpListener::bind(addr).await.map_err(|e| Error::io(format!("binding {addr}"), e))?;
        tokio::spawn(casfs::metrics::serve(l, metrics.clone()));
    }
    if !args.no_execution {
        let name = format!("casfs-serve@{}", hostname());
        let cfg = args.exec.config(name, args.storage.join("exec"));
        // The store is also the executor's blob cache: inputs are already local.
        let cache = casfs::cache::LocalCache::over_store(store.clone(), &metrics)?;
        let exec =
            Arc::new(Executor::new(cas.clone(), cache, cfg, metrics.clone()).with_profiles(args.exec.profiles()));
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
        let cached = Arc::new(casfs::exec::CachedExecutor::new(exec, store.clone()));
        backend.execution = Some(Scheduler::new(cached, sc));
    }
    let stopped = async {
        stop.wait().await;
        tracing::info!("signal received; the server shuts down");
    };
    bound.serve_with(backend, tls, stopped).await?;
    tracing::info!("server stopped");
    Ok(())
}

fn parse_ac_writes(s: &str) -> Result<AcWrites, String> {
    s.parse().map_err(|_| format!("{s:?}: expected all or none"))
}
