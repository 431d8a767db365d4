//! The `casfs` command line: serve, upload, download, ls, cat.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use casfs::cas::{Cas, DiskStore, GrpcStore, RemoteConfig};
use casfs::digest::Digest;
use casfs::error::{Error, Result};
use casfs::server::{Backend, Bound, Listen};
use casfs::tree::Directory;

/// Content-addressed filesystem, executor and REAPI endpoint for remote builds.
#[derive(Parser)]
#[command(name = "casfs", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the embedded REAPI server (CAS, ByteStream, ActionCache, Capabilities) on local disk.
    Serve(ServeArgs),
    /// Upload a local directory; prints the root Directory digest (HASH/SIZE).
    Upload {
        /// The directory to upload.
        dir: PathBuf,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Download the tree of a Directory digest into a new local directory.
    Download {
        /// Root Directory digest, HASH/SIZE or HASH-SIZE.
        digest: String,
        /// Destination (must not exist, or be empty).
        dir: PathBuf,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// List a Directory digest (mode, size, digest, name).
    Ls {
        /// Directory digest, HASH/SIZE or HASH-SIZE.
        digest: String,
        /// Walk subdirectories too.
        #[arg(short, long)]
        recursive: bool,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Write a blob's verified bytes to standard output.
    Cat {
        /// Blob digest, HASH/SIZE or HASH-SIZE.
        digest: String,
        #[command(flatten)]
        remote: RemoteArgs,
    },
}

#[derive(Args)]
struct ServeArgs {
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
    /// Serve over TLS with this PEM certificate chain (needs --tls-key).
    #[arg(long, env = "CASFS_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "CASFS_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

/// How to reach the REAPI server.
#[derive(Args, Clone)]
struct RemoteArgs {
    /// Server URL: grpc://HOST:PORT, grpcs://HOST:PORT (TLS) or unix:PATH.
    #[arg(long, env = "CASFS_REMOTE", default_value = "grpc://127.0.0.1:8980")]
    remote: String,
    /// REAPI instance name.
    #[arg(long, env = "CASFS_INSTANCE_NAME", default_value = "")]
    instance_name: String,
    /// Extra request header KEY=VALUE (repeatable), e.g. authorization=Bearer…
    #[arg(
        long = "remote-header",
        env = "CASFS_REMOTE_HEADERS",
        value_delimiter = ','
    )]
    remote_headers: Vec<String>,
    /// PEM CA bundle for grpcs:// (system roots when unset).
    #[arg(long, env = "CASFS_TLS_CA_FILE")]
    tls_ca_file: Option<PathBuf>,
    /// Retries of a call that failed with UNAVAILABLE (exponential backoff).
    #[arg(long, env = "CASFS_RETRIES", default_value_t = 5)]
    retries: u32,
    /// Deadline for one call attempt, e.g. 60s, 500ms, 2m.
    #[arg(long, env = "CASFS_RPC_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    rpc_timeout: Duration,
}

fn default_storage() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"));
    base.join("casfs").join("storage")
}

/// Parses `10G`, `512M`, `4096` (bytes; K/M/G/T are powers of 1024).
fn parse_size(s: &str) -> std::result::Result<u64, String> {
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
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a size"))?;
    if n < 0.0 {
        return Err(format!("{s:?} is negative"));
    }
    Ok((n * mult as f64) as u64)
}

/// Parses `60s`, `500ms`, `2m`, `1h` or a number of seconds.
fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len());
    let n: f64 = s[..split]
        .parse()
        .map_err(|_| format!("{s:?} is not a duration"))?;
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
    fn store(&self) -> Result<GrpcStore> {
        let mut cfg = RemoteConfig::new(&self.remote);
        cfg.instance_name = self.instance_name.clone();
        cfg.tls_ca_file = self.tls_ca_file.clone();
        cfg.retries = self.retries;
        cfg.rpc_timeout = self.rpc_timeout;
        for h in &self.remote_headers {
            cfg.headers.push(casfs::cas::channel::parse_header(h)?);
        }
        GrpcStore::new(&cfg)
    }
}

/// A usage error: reported on one line with exit status 2.
struct Usage(String);

fn digest_arg(text: &str) -> std::result::Result<Digest, Usage> {
    Digest::parse(text).map_err(|e| Usage(format!("invalid digest {text:?}: {e}")))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = if matches!(cli.cmd, Cmd::Serve(_)) {
        "info"
    } else {
        "warn"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("CASFS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("casfs: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli.cmd)) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(Usage(msg))) => {
            eprintln!("casfs: {msg}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("casfs: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cmd: Cmd) -> Result<std::result::Result<(), Usage>> {
    match cmd {
        Cmd::Serve(args) => serve(args).await,
        Cmd::Upload { dir, remote } => {
            let store = remote.store()?;
            let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
            let r = casfs::transfer::upload_dir(&store, &dir, progress).await?;
            eprintln!(
                "uploaded {} of {} blobs ({} bytes); {} files, {} dirs, {} symlinks",
                r.uploaded_blobs,
                r.blobs,
                r.uploaded_bytes,
                r.stats.files,
                r.stats.dirs,
                r.stats.symlinks
            );
            println!("{}", r.root);
            Ok(Ok(()))
        }
        Cmd::Download {
            digest,
            dir,
            remote,
        } => {
            let digest = match digest_arg(&digest) {
                Ok(d) => d,
                Err(u) => return Ok(Err(u)),
            };
            let store = remote.store()?;
            let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
            let s = casfs::transfer::download_dir(&store, &digest, &dir, progress).await?;
            eprintln!(
                "downloaded {} files, {} dirs, {} symlinks ({} bytes)",
                s.files, s.dirs, s.symlinks, s.bytes
            );
            Ok(Ok(()))
        }
        Cmd::Ls {
            digest,
            recursive,
            remote,
        } => {
            let digest = match digest_arg(&digest) {
                Ok(d) => d,
                Err(u) => return Ok(Err(u)),
            };
            ls(&remote.store()?, &digest, recursive).await.map(Ok)
        }
        Cmd::Cat { digest, remote } => {
            let digest = match digest_arg(&digest) {
                Ok(d) => d,
                Err(u) => return Ok(Err(u)),
            };
            cat(&remote.store()?, &digest).await.map(Ok)
        }
    }
}

async fn serve(args: ServeArgs) -> Result<std::result::Result<(), Usage>> {
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
            cert_pem: std::fs::read(c)
                .map_err(|e| Error::io(format!("reading {}", c.display()), e))?,
            key_pem: std::fs::read(k)
                .map_err(|e| Error::io(format!("reading {}", k.display()), e))?,
        }),
        _ => None,
    };
    let bound = Bound::bind(&listen).await?;
    let url = bound.url();
    let url = if tls.is_some() {
        url.replacen("grpc://", "grpcs://", 1)
    } else {
        url
    };
    println!("casfs: serving on {url}");
    let _ = std::io::stdout().flush();
    let backend = Backend {
        cas: store.clone(),
        ac: store,
    };
    bound.serve_with(backend, tls, shutdown_signal()).await?;
    tracing::info!("server stopped");
    Ok(Ok(()))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    tracing::info!("shutting down");
}

async fn ls(store: &GrpcStore, root: &Digest, recursive: bool) -> Result<()> {
    let mut stack = vec![(String::new(), *root)];
    let mut out = std::io::stdout().lock();
    while let Some((prefix, digest)) = stack.pop() {
        let dir = Directory::decode(&digest, &store.read(&digest).await?)?;
        let mut lines = Vec::new();
        for f in &dir.files {
            let mode = if f.executable {
                "-r-xr-xr-x"
            } else {
                "-r--r--r--"
            };
            lines.push((
                f.name.clone(),
                format!(
                    "{mode} {:>12} {} {prefix}{}",
                    f.digest.size(),
                    f.digest,
                    f.name
                ),
            ));
        }
        for d in &dir.dirs {
            lines.push((
                d.name.clone(),
                format!("dr-xr-xr-x {:>12} {} {prefix}{}/", "-", d.digest, d.name),
            ));
        }
        for s in &dir.symlinks {
            lines.push((
                s.name.clone(),
                format!(
                    "lrwxrwxrwx {:>12} {:>66} {prefix}{} -> {}",
                    "-", "-", s.name, s.target
                ),
            ));
        }
        lines.sort();
        for (_, l) in lines {
            writeln!(out, "{l}").map_err(|e| Error::io("writing to stdout", e))?;
        }
        if recursive {
            for d in dir.dirs.iter().rev() {
                stack.push((format!("{prefix}{}/", d.name), d.digest));
            }
        }
    }
    Ok(())
}

async fn cat(store: &GrpcStore, digest: &Digest) -> Result<()> {
    // Small blobs are verified in memory; large ones in a temporary file first, so nothing
    // unverified ever reaches standard output.
    let mut out = std::io::stdout().lock();
    if digest.size() <= 64 << 20 {
        let data = store.read(digest).await?;
        out.write_all(&data)
            .map_err(|e| Error::io("writing to stdout", e))?;
    } else {
        let tmp = tempfile::tempdir().map_err(|e| Error::io("creating a temporary folder", e))?;
        let path = tmp.path().join("blob");
        store.read_to_file(digest, &path).await?;
        let mut f =
            std::fs::File::open(&path).map_err(|e| Error::io("opening the fetched blob", e))?;
        std::io::copy(&mut f, &mut out).map_err(|e| Error::io("writing to stdout", e))?;
    }
    out.flush().map_err(|e| Error::io("writing to stdout", e))
}
