//! Connections to remote REAPI servers: endpoint URLs, TLS, unix sockets, headers, retries.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::error::{Error, IoContext, Result};

/// Where and how to reach a remote REAPI server.
#[derive(Clone, Debug)]
pub struct RemoteConfig {
    /// `grpc://host:port`, `grpcs://host:port` (TLS), `http(s)://…` or `unix:/path`.
    pub url: String,
    /// REAPI instance name ("" for the default instance).
    pub instance_name: String,
    /// Extra request headers (`authorization: Bearer …` and the like).
    pub headers: Vec<(String, String)>,
    /// PEM file of CA certificates for `grpcs://`; system roots when unset.
    pub tls_ca_file: Option<PathBuf>,
    /// PEM certificate and key files presented to servers that require client certificates.
    pub tls_client_identity: Option<(PathBuf, PathBuf)>,
    /// Attempts after the first for UNAVAILABLE and RESOURCE_EXHAUSTED answers.
    pub retries: u32,
    /// Deadline for one attempt of a unary call, and for each message of a stream.
    pub rpc_timeout: Duration,
    /// Transfer large blobs by their chunks when the server offers SplitBlob/SpliceBlob.
    pub chunking: bool,
    /// Blobs of at least this many bytes travel zstd-compressed when the server offers zstd
    /// (`None`: never).
    pub compress_threshold: Option<u64>,
}

impl RemoteConfig {
    /// A config for `url` with defaults for everything else.
    pub fn new(url: impl Into<String>) -> Self {
        RemoteConfig {
            url: url.into(),
            instance_name: String::new(),
            headers: Vec::new(),
            tls_ca_file: None,
            tls_client_identity: None,
            retries: 5,
            rpc_timeout: Duration::from_secs(60),
            chunking: false,
            compress_threshold: None,
        }
    }
}

/// Adds the configured headers to every request.
#[derive(Clone)]
pub struct Headers(std::sync::Arc<Vec<(AsciiMetadataKey, AsciiMetadataValue)>>);

impl tonic::service::Interceptor for Headers {
    fn call(&mut self, mut req: tonic::Request<()>) -> std::result::Result<tonic::Request<()>, tonic::Status> {
        for (k, v) in self.0.iter() {
            req.metadata_mut().append(k.clone(), v.clone());
        }
        Ok(req)
    }
}

/// A channel with the header interceptor, as every generated client takes it.
pub type Conn = InterceptedService<Channel, Headers>;

/// Parses `k=v` (or `k:v`) header arguments.
pub fn parse_header(text: &str) -> Result<(String, String)> {
    let (k, v) = text
        .split_once('=')
        .or_else(|| text.split_once(':'))
        .ok_or_else(|| Error::InvalidArgument(format!("header {text:?} is not KEY=VALUE")))?;
    Ok((k.trim().to_ascii_lowercase(), v.trim().to_string()))
}

/// Builds a lazily connecting channel: a dead server shows up as UNAVAILABLE on the first
/// call (and is retried), never as a hang or a failure at construction.
pub fn connect(cfg: &RemoteConfig) -> Result<Conn> {
    let mut headers = Vec::new();
    for (k, v) in &cfg.headers {
        let key = AsciiMetadataKey::from_bytes(k.as_bytes())
            .map_err(|_| Error::InvalidArgument(format!("bad header name {k:?}")))?;
        let val = AsciiMetadataValue::try_from(v.as_str())
            .map_err(|_| Error::InvalidArgument(format!("bad value for header {k:?}")))?;
        headers.push((key, val));
    }
    let headers = Headers(std::sync::Arc::new(headers));
    let url = cfg.url.trim();
    let bad = |why: String| Error::InvalidArgument(format!("remote {url:?}: {why}"));
    let tune = |ep: Endpoint| {
        ep.connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(20))
            .initial_stream_window_size(Some(8 << 20))
            .initial_connection_window_size(Some(32 << 20))
            // Blob downloads arrive in 1 MiB messages: larger frames mean fewer of them.
            .max_frame_size(Some(1 << 20))
    };
    if let Some(path) = url.strip_prefix("unix://").or_else(|| url.strip_prefix("unix:")) {
        let path = PathBuf::from(path);
        let ep = tune(Endpoint::from_static("http://localhost"));
        let channel = ep.connect_with_connector_lazy(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }));
        return Ok(InterceptedService::new(channel, headers));
    }
    let (scheme, rest) = url.split_once("://").ok_or_else(|| bad("expected SCHEME://HOST:PORT".into()))?;
    let tls = match scheme {
        "grpc" | "http" => false,
        "grpcs" | "https" => true,
        other => return Err(bad(format!("unknown scheme {other:?} (grpc, grpcs, http, https, unix)"))),
    };
    let host_port = rest.trim_end_matches('/');
    let http_url = format!("{}://{host_port}", if tls { "https" } else { "http" });
    let mut ep = tune(Endpoint::from_shared(http_url).map_err(|e| bad(e.to_string()))?);
    if tls {
        let mut tls_cfg = ClientTlsConfig::new();
        tls_cfg = match &cfg.tls_ca_file {
            Some(ca) => {
                let pem = std::fs::read(ca).ctx(|| format!("reading CA file {}", ca.display()))?;
                tls_cfg.ca_certificate(Certificate::from_pem(pem))
            }
            None => tls_cfg.with_native_roots(),
        };
        if let Some((cert, key)) = &cfg.tls_client_identity {
            let c = std::fs::read(cert).ctx(|| format!("reading client certificate {}", cert.display()))?;
            let k = std::fs::read(key).ctx(|| format!("reading client key {}", key.display()))?;
            tls_cfg = tls_cfg.identity(tonic::transport::Identity::from_pem(c, k));
        }
        ep = ep.tls_config(tls_cfg).map_err(|e| bad(e.to_string()))?;
    }
    Ok(InterceptedService::new(ep.connect_lazy(), headers))
}

/// Retry policy for calls to a remote server.
#[derive(Clone, Copy, Debug)]
pub struct Retry {
    /// Attempts after the first.
    pub retries: u32,
    /// Deadline for each attempt.
    pub timeout: Duration,
}

impl Retry {
    /// [`Retry::run`] for one unary call: each attempt calls `f` with fresh clones of
    /// `client` and `req`.
    pub async fn unary<C, Q, T, F, Fut>(&self, what: &str, client: &C, req: &Q, f: F) -> Result<T>
    where
        C: Clone,
        Q: Clone,
        F: Fn(C, Q) -> Fut,
        Fut: Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        self.run(what, || {
            let call = f(client.clone(), req.clone());
            async move { call.await.map(|r| r.into_inner()) }
        })
        .await
    }

    /// Runs `call` until it succeeds, fails for good, or the attempts run out. Retries
    /// UNAVAILABLE, RESOURCE_EXHAUSTED and attempts that hit the deadline, with exponential
    /// backoff (100 ms doubling to 5 s, with jitter).
    pub async fn run<T, F, Fut>(&self, what: &str, mut call: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = std::result::Result<T, tonic::Status>>,
    {
        let mut delay = Duration::from_millis(100);
        let mut attempt = 0;
        loop {
            let status = match tokio::time::timeout(self.timeout, call()).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(status)) => status,
                Err(_) => tonic::Status::deadline_exceeded(format!("no answer within {:?}", self.timeout)),
            };
            let transient = matches!(
                status.code(),
                tonic::Code::Unavailable | tonic::Code::ResourceExhausted | tonic::Code::DeadlineExceeded
            );
            if !transient || attempt >= self.retries {
                return Err(Error::remote(what, status));
            }
            attempt += 1;
            let jitter = Duration::from_millis(rand::random::<u64>() % (delay.as_millis() as u64 / 2 + 1));
            tracing::debug!(what, attempt, code = ?status.code(), "retrying after {:?}", delay + jitter);
            tokio::time::sleep(delay + jitter).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }
}
