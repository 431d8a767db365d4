//! `casfs serve`: the embedded REAPI server on local disk.

use std::io::Write;

use casfs::error::Error;
use casfs::metrics::Metrics;
use casfs::server::{Bound, Instances, Listen};

pub use super::serve_args::ServeArgs;
use super::serve_backends::{backends, check_unique, metrics_page};
use super::signals::Shutdown;
use super::{usage, CmdResult};

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
    check_unique(&args.instances)?;
    if args.upload_idle_timeout.is_zero() {
        return Err(usage("--upload-idle-timeout must be more than 0"));
    }
    let served = backends(&args, &metrics)?;
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
    let asset_fetch = casfs::server::AssetFetch {
        allow: args.asset_fetch.iter().filter(|p| !p.is_empty()).cloned().collect(),
        max_bytes: args.asset_max_size,
        timeout: args.asset_timeout,
        ..Default::default()
    };
    if let Some(p) = asset_fetch.allow.iter().find(|p| !p.starts_with("http://") && !p.starts_with("https://")) {
        return Err(usage(format!("--asset-fetch {p:?}: a prefix starts with http:// or https://")));
    }
    let mut auth_token = None;
    if let Some(p) = &args.auth_token_file {
        let token = std::fs::read_to_string(p).map_err(|e| Error::io(format!("reading {}", p.display()), e))?;
        if token.trim().is_empty() {
            return Err(usage(format!("{} holds no token", p.display())));
        }
        auth_token = Some(token.trim().to_string());
    }
    if let Some(addr) = &args.metrics_listen {
        let l = tokio::net::TcpListener::bind(addr).await.map_err(|e| Error::io(format!("binding {addr}"), e))?;
        tokio::spawn(casfs::metrics::serve_page(l, metrics_page(&served, &metrics)));
    }
    // Server-wide settings go to every backend.
    let mut list = Vec::new();
    for (name, b, _) in &served.backends {
        let mut b = b.clone();
        b.upload_idle_timeout = args.upload_idle_timeout;
        b.auth_token = auth_token.clone();
        b.asset_fetch = asset_fetch.clone();
        list.push((name.clone(), b));
    }
    let instances = match list.pop() {
        Some((None, b)) => Instances::single(b),
        last => {
            list.extend(last);
            Instances::named(list.into_iter().map(|(n, b)| (n.unwrap_or_default(), b)).collect())?
        }
    };
    let stopped = async {
        stop.wait().await;
        tracing::info!("signal received; the server shuts down");
    };
    bound.serve_with(instances, tls, stopped).await?;
    tracing::info!("server stopped");
    Ok(())
}
