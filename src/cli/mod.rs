//! Command-line plumbing shared by the subcommands: remote options, parsers, usage errors.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use casfs::cas::{GrpcStore, RemoteConfig};
use casfs::digest::{Digest, DigestFunction};
use casfs::error::Result;

pub mod action;
pub mod asset;
pub mod exec_args;
pub mod execute;
pub mod make_action;
pub mod mount;
pub mod run;
pub mod serve;
pub mod serve_args;
pub mod serve_backends;
pub mod signals;
pub mod transfer;
pub mod worker;

/// How to reach the REAPI server.
#[derive(Args, Clone)]
pub struct RemoteArgs {
    /// Server URL: grpc://HOST:PORT, grpcs://HOST:PORT (TLS) or unix:PATH.
    #[arg(long, env = "CASFS_REMOTE", default_value = "grpc://127.0.0.1:8980")]
    pub remote: String,
    /// Digest function of the digests given and made: sha256, sha1, md5, sha384, sha512,
    /// blake3 (with sha256, a digest given by hash is read by its length, as REAPI does).
    #[arg(long, env = "CASFS_DIGEST_FUNCTION", default_value = "sha256")]
    pub digest_function: DigestFunction,
    #[command(flatten)]
    pub conn: ConnArgs,
}

/// Connection options for any remote (instance, headers, TLS, retries, deadlines).
#[derive(Args, Clone)]
pub struct ConnArgs {
    /// REAPI instance name.
    #[arg(long, env = "CASFS_INSTANCE_NAME", default_value = "")]
    pub instance_name: String,
    /// Extra request header KEY=VALUE (repeatable), e.g. authorization=Bearer…
    #[arg(long = "remote-header", env = "CASFS_REMOTE_HEADERS", value_delimiter = ',')]
    pub remote_headers: Vec<String>,
    /// PEM CA bundle for grpcs:// (system roots when unset).
    #[arg(long, env = "CASFS_TLS_CA_FILE")]
    pub tls_ca_file: Option<PathBuf>,
    /// PEM client certificate for servers that require one (needs --tls-client-key).
    #[arg(long, env = "CASFS_TLS_CLIENT_CERT", requires = "tls_client_key")]
    pub tls_client_cert: Option<PathBuf>,
    /// PEM private key of --tls-client-cert.
    #[arg(long, env = "CASFS_TLS_CLIENT_KEY", requires = "tls_client_cert")]
    pub tls_client_key: Option<PathBuf>,
    /// Retries of a call that failed with UNAVAILABLE or timed out, and resumed reads in a row
    /// without progress of a download that broke off (exponential backoff).
    #[arg(long, env = "CASFS_RETRIES", default_value_t = 5)]
    pub retries: u32,
    /// Deadline for one call attempt, e.g. 60s, 500ms, 2m; for a download, the longest wait
    /// for its next bytes (a stalled or broken download resumes where it stopped).
    #[arg(long, env = "CASFS_RPC_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub rpc_timeout: Duration,
    /// Transfer large blobs by their chunks (SplitBlob/SpliceBlob) when the server offers
    /// it: fewer bytes for a new version of a large file, more work for a first one.
    #[arg(long, env = "CASFS_CHUNKING")]
    pub chunking: bool,
    /// Blobs of at least this size (4K, 1M, …) travel zstd-compressed when the server offers
    /// zstd; `off` (the default, or 0) never compresses.
    #[arg(long, env = "CASFS_COMPRESS_THRESHOLD", default_value = "off", value_parser = parse_threshold)]
    pub compress_threshold: Threshold,
}

/// A `--compress-threshold`: `None` when compression is off.
#[derive(Clone, Copy, Debug)]
pub struct Threshold(pub Option<u64>);

/// Parses `off`, `0` or a size.
pub fn parse_threshold(s: &str) -> std::result::Result<Threshold, String> {
    match s.trim() {
        "off" | "none" | "no" => Ok(Threshold(None)),
        s => parse_size(s).map(|n| Threshold((n > 0).then_some(n))),
    }
}

/// The local blob cache shared by mounts, `casfs run` and `casfs worker`.
#[derive(Args, Clone, Debug)]
pub struct CacheArgs {
    /// Local blob cache, shared with mounts, runs and workers.
    #[arg(long, env = "CASFS_CACHE_DIR", default_value_os_t = default_storage().with_file_name("blobs"))]
    pub cache_dir: PathBuf,
    /// Bound of the local blob cache (least recently used blobs evicted first).
    #[arg(long, env = "CASFS_CACHE_SIZE", default_value = "10G", value_parser = parse_size)]
    pub cache_size: u64,
    /// Bound on the memory the cache and the filesystem hold: small blobs, Directories,
    /// fetches in flight, large blobs in memory files and inodes (the process adds ~64 MiB
    /// of its own). Under pressure they evict, wait or go to disk first
    /// [default: an eighth of the machine's memory, between 512M and 4G].
    #[arg(long, env = "CASFS_MEMORY_BUDGET", value_parser = parse_size)]
    pub memory_budget: Option<u64>,
}

impl CacheArgs {
    /// The memory budget: the flag's, or the machine's default.
    pub fn budget(&self) -> casfs::cache::MemoryBudget {
        self.memory_budget.map_or_else(casfs::cache::MemoryBudget::default_for_machine, casfs::cache::MemoryBudget)
    }

    /// Opens (or creates) the cache; its hit counters land in `metrics`.
    pub fn open(&self, metrics: &casfs::metrics::Metrics) -> Result<std::sync::Arc<casfs::cache::LocalCache>> {
        let cfg = casfs::cache::CacheConfig::with_budget(&self.cache_dir, self.cache_size, self.budget());
        casfs::cache::LocalCache::open(&cfg, metrics)
    }

    /// Fetcher settings whose memory shares come from the budget.
    pub fn fetch_config(&self) -> casfs::fs::FetchConfig {
        let b = self.budget();
        casfs::fs::FetchConfig {
            dir_cache_bytes: b.directories(),
            in_flight_bytes: b.in_flight(),
            ..casfs::fs::FetchConfig::default()
        }
    }
}

pub fn default_storage() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"));
    base.join("casfs").join("storage")
}

/// Parses `10G`, `512M`, `4096` (bytes; K/M/G/T are powers of 1024).
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                'B' => 1,
                _ => return Err(format!("unknown size suffix in {s:?}")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: f64 = num.trim().parse().map_err(|_| format!("{s:?} is not a size"))?;
    if n < 0.0 {
        return Err(format!("{s:?} is negative"));
    }
    Ok((n * mult as f64) as u64)
}

/// Parses `60s`, `500ms`, `2m`, `1h` or a number of seconds.
pub fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len());
    let n: f64 = s[..split].parse().map_err(|_| format!("{s:?} is not a duration"))?;
    let secs = match &s[split..] {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        u => return Err(format!("unknown unit {u:?} in {s:?}")),
    };
    if !(0.0..=1e9).contains(&secs) {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

impl RemoteArgs {
    /// A digest given on the command line, under `--digest-function`.
    pub fn digest(&self, text: &str) -> CmdResult<Digest> {
        digest_arg_with(self.digest_function, text)
    }

    /// A gRPC store client for these options.
    pub fn store(&self) -> Result<GrpcStore> {
        GrpcStore::new(&self.conn.config(&self.remote)?)
    }
}

impl ConnArgs {
    /// The client config for the server at `url`.
    pub fn config(&self, url: &str) -> Result<RemoteConfig> {
        let mut cfg = RemoteConfig::new(url);
        cfg.instance_name = self.instance_name.clone();
        cfg.tls_ca_file = self.tls_ca_file.clone();
        cfg.tls_client_identity = self.tls_client_cert.clone().zip(self.tls_client_key.clone());
        cfg.retries = self.retries;
        cfg.rpc_timeout = self.rpc_timeout;
        cfg.chunking = self.chunking;
        cfg.compress_threshold = self.compress_threshold.0;
        for h in &self.remote_headers {
            cfg.headers.push(casfs::cas::parse_header(h)?);
        }
        Ok(cfg)
    }
}

/// Why a subcommand failed; the exit status follows from it.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The command line is wrong: one line on stderr, exit status 2.
    #[error("{0}")]
    Usage(String),
    /// The work failed: one line on stderr, exit status 1.
    #[error(transparent)]
    Failed(#[from] casfs::Error),
}

/// A usage error with this message.
pub fn usage(msg: impl Into<String>) -> CliError {
    CliError::Usage(msg.into())
}

/// A digest given on the command line (a malformed one is a usage error).
pub fn digest_arg(text: &str) -> CmdResult<Digest> {
    Digest::parse(text).map_err(|e| usage(format!("invalid digest {text:?}: {e}")))
}

/// A digest given on the command line under `function` (SHA-256: inferred from the length).
pub fn digest_arg_with(function: DigestFunction, text: &str) -> CmdResult<Digest> {
    match function {
        DigestFunction::Sha256 => digest_arg(text),
        f => Digest::parse_with(f, text).map_err(|e| usage(format!("invalid {f} digest {text:?}: {e}"))),
    }
}

/// What a subcommand returns.
pub type CmdResult<T = ()> = std::result::Result<T, CliError>;
