//! `casfs serve`: the embedded REAPI server on local disk.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;

use casfs::cas::DiskStore;
use casfs::error::Error;
use casfs::server::{Backend, Bound, Listen};

use super::{default_storage, parse_size, CmdResult, Usage};

#[derive(Args)]
pub struct ServeArgs {
    /// Address to listen on: HOST:PORT (port 0 picks one) or unix:PATH.
    #[arg(long, env = "CASFS_LISTEN", default_value = "127.0.0.1:8980")]
    listen: String,
    /// Folder holding blobs and action results (created if missing).
    #[arg(long, env = "CASFS_STORAGE", default_value_os_t = default_storage())]
    storage: PathBuf,
    /// Bound on stored blob bytes, least recently used evicted first (e.g. 10G; 0 = none).
    #[arg(long, env = "CASFS_STORAGE_SIZE", default_value = "10G", value_parser = parse_size)]
    storage_size: u64,
    /// Allow a listen address other than loopback. There is no authentication: put the
    /// server behind TLS client auth or a proxy before exposing it.
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
}

/// Runs the server until SIGINT or SIGTERM.
pub async fn serve(args: ServeArgs) -> CmdResult {
    let listen: Listen = match args.listen.parse() {
        Ok(l) => l,
        Err(e) => return Ok(Err(Usage(e.to_string()))),
    };
    if let Listen::Tcp(addr) = &listen {
        if !addr.ip().is_loopback() && !args.allow_remote_clients {
            return Ok(Err(Usage(format!(
                "refusing to listen on {addr}: not loopback (pass --allow-remote-clients; there is no authentication)"
            ))));
        }
        if !addr.ip().is_loopback() {
            tracing::warn!(%addr, "listening beyond loopback without authentication");
        }
    }
    let store = Arc::new(DiskStore::open(&args.storage, args.storage_size)?);
    tracing::info!(storage = %args.storage.display(), blobs = store.blob_count(), bytes = store.total_bytes(), "storage opened");
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => Some(casfs::server::TlsFiles {
            cert_pem: std::fs::read(c).map_err(|e| Error::io(format!("reading {}", c.display()), e))?,
            key_pem: std::fs::read(k).map_err(|e| Error::io(format!("reading {}", k.display()), e))?,
        }),
        _ => None,
    };
    let bound = Bound::bind(&listen).await?;
    let url = bound.url();
    let url = if tls.is_some() { url.replacen("grpc://", "grpcs://", 1) } else { url };
    println!("casfs: serving on {url}");
    let _ = std::io::stdout().flush();
    let cas: casfs::cas::SharedCas = match &args.access_log {
        Some(p) => Arc::new(casfs::server::access_log::AccessLog::open(store.clone(), p)?),
        None => store.clone(),
    };
    let backend = Backend { cas, ac: store };
    bound.serve_with(backend, tls, shutdown_signal()).await?;
    tracing::info!("server stopped");
    Ok(Ok(()))
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    tracing::info!("shutting down");
}
