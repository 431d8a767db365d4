//! The embedded REAPI server: tonic services over any store.
//!
//! By default one namespace serves every instance name: blobs are content-addressed, so
//! instances share storage (as in Buildbarn's default configuration); the name is still
//! parsed and checked. [`Instances`] names deployments instead, each with its own stores.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tonic::service::interceptor::InterceptedService;

use crate::cas::{SharedActionCache, SharedCas};
use crate::error::{Error, IoContext, Result};
use crate::proto::bytestream::byte_stream_server::ByteStreamServer;
use crate::proto::reapi::action_cache_server::ActionCacheServer;
use crate::proto::reapi::capabilities_server::CapabilitiesServer;
use crate::proto::reapi::content_addressable_storage_server::ContentAddressableStorageServer;
use crate::proto::reapi::execution_server::ExecutionServer;

mod ac;
pub use ac::AcWrites;
mod asset;
mod asset_http;
pub use asset_http::AssetFetch;
pub(crate) mod auth;
mod bytestream;
mod capabilities;
mod cas;
mod compressed;
pub(crate) mod execution;
mod get_tree;
mod instances;
pub use instances::{check_name as check_instance_name, Instances};
pub(crate) mod resource;
pub mod scheduler;
mod split;

/// Largest total of blob bytes one batch request may carry; advertised in Capabilities and
/// enforced. Below the 4 MiB gRPC message limit so a full batch still fits one message.
pub const MAX_BATCH_BYTES: u64 = (4 << 20) - (64 << 10);
/// Largest message the services decode (a full batch plus its framing fits easily).
const MAX_MESSAGE: usize = 8 << 20;
/// Bytes per ByteStream Read response.
pub const READ_CHUNK: usize = 1 << 20;
/// How long an upload may go without delivering [`UPLOAD_PROGRESS_BYTES`] before it is
/// aborted, unless the server is told otherwise.
pub const DEFAULT_UPLOAD_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Bytes an upload must deliver within each idle timeout (or finish) to stay open: a client
/// that trickles a byte now and then is as idle as one that sends nothing.
pub const UPLOAD_PROGRESS_BYTES: u64 = 64 << 10;

/// The stores a server exposes.
#[derive(Clone)]
pub struct Backend {
    /// Blob storage.
    pub cas: SharedCas,
    /// Action results.
    pub ac: SharedActionCache,
    /// The Execution service's scheduler; `None` serves storage only.
    pub execution: Option<Arc<scheduler::Scheduler>>,
    /// When set, every call must present `authorization: Bearer <token>`.
    pub auth_token: Option<String>,
    /// An upload that delivers less than [`UPLOAD_PROGRESS_BYTES`] in this long is aborted
    /// (DEADLINE_EXCEEDED) and its temporary file removed.
    pub upload_idle_timeout: Duration,
    /// Whether clients may write the action cache (the executor always may) and push
    /// Remote Asset records.
    pub ac_writes: AcWrites,
    /// What the Remote Asset Fetch service may download itself (nothing by default).
    pub asset_fetch: AssetFetch,
    /// Where the services count what they carry (bytes on the wire, by compressor).
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl Backend {
    /// A storage-only backend (no Execution service) with the default limits.
    pub fn new(cas: SharedCas, ac: SharedActionCache) -> Self {
        Backend {
            cas,
            ac,
            execution: None,
            auth_token: None,
            upload_idle_timeout: DEFAULT_UPLOAD_IDLE_TIMEOUT,
            ac_writes: AcWrites::All,
            asset_fetch: AssetFetch::default(),
            metrics: crate::metrics::Metrics::new(),
        }
    }
}

/// Where the server listens.
#[derive(Debug, Clone)]
pub enum Listen {
    /// A TCP address (`127.0.0.1:8980`; port 0 picks a free one).
    Tcp(std::net::SocketAddr),
    /// A unix socket path.
    Unix(PathBuf),
}

impl std::str::FromStr for Listen {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        if let Some(p) = s.strip_prefix("unix://").or_else(|| s.strip_prefix("unix:")) {
            return Ok(Listen::Unix(PathBuf::from(p)));
        }
        let s = s.strip_prefix("grpc://").unwrap_or(s);
        s.parse()
            .map(Listen::Tcp)
            .map_err(|_| Error::InvalidArgument(format!("listen address {s:?} is not HOST:PORT or unix:PATH")))
    }
}

/// PEM certificate chain and key for serving over TLS.
#[derive(Clone)]
pub struct TlsFiles {
    /// Certificate chain (PEM).
    pub cert_pem: Vec<u8>,
    /// Private key (PEM).
    pub key_pem: Vec<u8>,
    /// CA bundle (PEM) that client certificates must chain to; `None` accepts any client.
    pub client_ca_pem: Option<Vec<u8>>,
}

fn router(instances: Instances, tls: Option<TlsFiles>) -> Result<tonic::transport::server::Router> {
    let instances = Arc::new(instances);
    let backend = instances.first().clone();
    let cas = ContentAddressableStorageServer::new(cas::CasService::new(instances.clone()))
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let bs = ByteStreamServer::new(bytestream::ByteStreamService::new(instances.clone()))
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let ac = ActionCacheServer::new(ac::AcService::new(instances.clone())).max_decoding_message_size(MAX_MESSAGE);
    let caps = CapabilitiesServer::new(capabilities::CapabilitiesService { instances: instances.clone() });
    let assets = asset::AssetService::new(instances.clone())?;
    let fetch = crate::proto::asset::fetch_server::FetchServer::from_arc(assets.clone());
    let push = crate::proto::asset::push_server::PushServer::from_arc(assets);
    let exec =
        instances.any_execution().then(|| ExecutionServer::new(execution::ExecutionService::new(instances.clone())));
    let mut builder = tonic::transport::Server::builder();
    if let Some(t) = tls {
        let identity = tonic::transport::Identity::from_pem(t.cert_pem, t.key_pem);
        let mut cfg = tonic::transport::ServerTlsConfig::new().identity(identity);
        if let Some(ca) = t.client_ca_pem {
            cfg = cfg.client_ca_root(tonic::transport::Certificate::from_pem(ca));
        }
        builder = builder.tls_config(cfg).map_err(|e| Error::InvalidArgument(format!("TLS configuration: {e}")))?;
    }
    let check = auth::TokenCheck::new(backend.auth_token.as_deref());
    Ok(builder
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(32 << 20))
        .add_service(InterceptedService::new(cas, check.clone()))
        .add_service(InterceptedService::new(bs, check.clone()))
        .add_service(InterceptedService::new(ac, check.clone()))
        .add_service(InterceptedService::new(caps, check.clone()))
        .add_service(InterceptedService::new(fetch, check.clone()))
        .add_service(InterceptedService::new(push, check.clone()))
        .add_optional_service(exec.map(|e| InterceptedService::new(e, check.clone()))))
}

/// A bound, not yet serving, listener; lets callers learn the port before serving.
pub enum Bound {
    /// Bound TCP socket.
    Tcp(tokio::net::TcpListener),
    /// Bound unix socket.
    Unix(tokio::net::UnixListener, PathBuf),
}

impl Bound {
    /// Binds the address (removing a stale unix socket file first).
    pub async fn bind(listen: &Listen) -> Result<Self> {
        match listen {
            Listen::Tcp(addr) => {
                let l = tokio::net::TcpListener::bind(addr).await.ctx(|| format!("binding {addr}"))?;
                Ok(Bound::Tcp(l))
            }
            Listen::Unix(path) => {
                let _ = std::fs::remove_file(path);
                let l = tokio::net::UnixListener::bind(path).ctx(|| format!("binding {}", path.display()))?;
                Ok(Bound::Unix(l, path.clone()))
            }
        }
    }

    /// The address clients use: `grpc://IP:PORT` or `unix:PATH`.
    pub fn url(&self) -> String {
        match self {
            Bound::Tcp(l) => match l.local_addr() {
                Ok(a) => format!("grpc://{a}"),
                Err(_) => "grpc://?".into(),
            },
            Bound::Unix(_, p) => format!("unix:{}", p.display()),
        }
    }

    /// Serves one backend (or named [`Instances`]) until `shutdown` resolves, then drains
    /// in-flight calls.
    pub async fn serve(self, backend: impl Into<Instances>, shutdown: impl Future<Output = ()> + Send) -> Result<()> {
        self.serve_with(backend, None, shutdown).await
    }

    /// Like [`Bound::serve`], over TLS when `tls` is given.
    pub async fn serve_with(
        self,
        backend: impl Into<Instances>,
        tls: Option<TlsFiles>,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<()> {
        let r = router(backend.into(), tls)?;
        let res = match self {
            Bound::Tcp(l) => {
                let incoming = TcpListenerStream::new(l).map_ok_nodelay();
                r.serve_with_incoming_shutdown(incoming, shutdown).await
            }
            Bound::Unix(l, path) => {
                let res = r.serve_with_incoming_shutdown(UnixListenerStream::new(l), shutdown).await;
                let _ = std::fs::remove_file(path);
                res
            }
        };
        res.map_err(|e| Error::Unavailable(format!("server: {e}")))
    }
}

/// Sets TCP_NODELAY on accepted connections (small RPCs must not wait for Nagle).
trait NoDelay {
    fn map_ok_nodelay(self) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>>;
}

impl NoDelay for TcpListenerStream {
    fn map_ok_nodelay(self) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
        use futures::StreamExt;
        self.map(|s| {
            s.inspect(|s| {
                let _ = s.set_nodelay(true);
            })
        })
    }
}

/// Maps a crate error to the status a client sees, logging server-side faults.
pub(crate) fn status(e: Error) -> tonic::Status {
    let st: tonic::Status = e.into();
    if matches!(st.code(), tonic::Code::Internal | tonic::Code::Unknown) {
        tracing::error!(error = %st.message(), "internal error");
    }
    st
}
