//! The `casfs` command line: serve, mount, upload, download, ls, cat.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cli;

use cli::{usage, CliError, CmdResult, RemoteArgs};

/// Content-addressed filesystem, executor and REAPI endpoint for remote builds.
#[derive(Parser)]
#[command(name = "casfs", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the embedded REAPI server (CAS, ByteStream, ActionCache, Execution) on local disk.
    Serve(Box<cli::serve::ServeArgs>),
    /// Mount a Directory digest read-only, fetching lazily and verifying every blob.
    Mount(cli::mount::MountArgs),
    /// Build an Action from a command line (uploading its inputs) and print its digest.
    Action(cli::make_action::ActionArgs),
    /// Print the digest (HASH/SIZE) of local files, hashed as casfs hashes outputs.
    Digest {
        /// Files to hash.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Digest function: sha256, sha1, md5, sha384, sha512, blake3.
        #[arg(long, env = "CASFS_DIGEST_FUNCTION", default_value = "sha256")]
        digest_function: casfs::digest::DigestFunction,
    },
    /// Execute one Action (sandboxed, inputs mounted lazily) and print its ActionResult.
    #[command(after_help = cli::run::EXIT_STATUS_HELP)]
    Run(cli::run::RunArgs),
    /// Execute actions for a Remote Workers API scheduler (BuildGrid): take leases, run them,
    /// report their results.
    Worker(cli::worker::WorkerArgs),
    /// Run a command line on a remote Execution service (inputs uploaded) and show its result.
    Execute(cli::execute::ExecuteArgs),
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
        /// Directory digest, HASH/SIZE or HASH-SIZE (with --action: the action digest).
        digest: String,
        /// With --action: a path inside the action's view (e.g. outputs).
        path: Option<String>,
        /// Walk subdirectories too.
        #[arg(short, long)]
        recursive: bool,
        /// Show the cached result of an action (exit_code, stdout, stderr, JSON, outputs/),
        /// as the browse mount does.
        #[arg(long)]
        action: bool,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Remote Asset API: which digest a URI names (fetch), or record one (push).
    #[command(subcommand)]
    Asset(cli::asset::AssetCmd),
    /// Write a blob's verified bytes to standard output.
    Cat {
        /// Blob digest, HASH/SIZE or HASH-SIZE (with --action: the action digest).
        digest: String,
        /// With --action: the file inside the action's view (stdout, outputs/a.o, ...).
        path: Option<String>,
        /// Read from the cached result of an action, as the browse mount shows it.
        #[arg(long)]
        action: bool,
        #[command(flatten)]
        remote: RemoteArgs,
    },
}

fn main() -> ExitCode {
    // Each FUSE session allocates 16 MiB request buffers. A fixed mmap threshold below that
    // makes glibc return them to the system when a mount ends, instead of raising the
    // threshold and keeping them in its heap: a server running many short-lived action mounts
    // stays small. The threshold stays above the 1 MiB chunks that blobs travel in, and the
    // trim threshold keeps a few of those in the heap: freshly mapped pages cost about 1 s per
    // GiB on a VM, more than receiving the bytes (a 1 GiB read took 2.5 s instead of 0.7 s
    // with 1 MiB thresholds).
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes the allocator's tuning; called before any thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 32 << 20);
    }
    let cli = Cli::parse();
    // A detaching mount forks before any thread (logging, runtime) exists.
    let mut ready = None;
    if let Cmd::Mount(args) = &cli.cmd {
        match cli::mount::prepare(args) {
            Ok(r) => ready = Some(r),
            Err(code) => return ExitCode::from(code),
        }
    }
    let default_level = if matches!(cli.cmd, Cmd::Serve(_) | Cmd::Mount(_) | Cmd::Worker(_)) { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("CASFS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    // Colour only for a person at a terminal: never in log files (`--log-file` redirects
    // stderr before this point), pipes or CI logs, and never with NO_COLOR set.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("casfs: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli.cmd, ready)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("casfs: {e}");
            ExitCode::from(if matches!(e, CliError::Usage(_)) { 2 } else { 1 })
        }
    }
}

/// Runs a subcommand; returns its exit status (0 unless it says otherwise) or a usage error.
async fn run(cmd: Cmd, ready: Option<cli::mount::Ready>) -> CmdResult<u8> {
    let done: CmdResult = match cmd {
        Cmd::Serve(args) => cli::serve::serve(*args).await,
        Cmd::Mount(args) => cli::mount::run(args, ready.unwrap_or(cli::mount::Ready::Nobody)).await,
        // `casfs run` says by its exit status how the action went.
        Cmd::Run(args) => return cli::run::run(args).await,
        Cmd::Worker(args) => cli::worker::run(args).await,
        Cmd::Action(args) => cli::make_action::create(args).await,
        Cmd::Execute(args) => cli::execute::execute(args).await,
        Cmd::Asset(cmd) => cli::asset::run(cmd).await,
        Cmd::Digest { files, digest_function } => {
            for f in files {
                let d = casfs::digest::hash_file_with(digest_function, &f)
                    .map_err(|e| casfs::Error::io(format!("hashing {}", f.display()), e))?;
                println!("{d}  {}", f.display());
            }
            Ok(())
        }
        Cmd::Upload { dir, remote } => {
            let store = remote.store()?;
            let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
            let r = casfs::transfer::upload_dir_with(remote.digest_function, &store, &dir, progress).await?;
            eprintln!(
                "uploaded {} of {} blobs ({} bytes); {} files, {} dirs, {} symlinks",
                r.uploaded_blobs, r.blobs, r.uploaded_bytes, r.stats.files, r.stats.dirs, r.stats.symlinks
            );
            println!("{}", r.root);
            Ok(())
        }
        Cmd::Download { digest, dir, remote } => {
            let digest = remote.digest(&digest)?;
            let store = remote.store()?;
            let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
            let s = casfs::transfer::download_dir(&store, &digest, &dir, progress).await?;
            eprintln!("downloaded {} files, {} dirs, {} symlinks ({} bytes)", s.files, s.dirs, s.symlinks, s.bytes);
            Ok(())
        }
        Cmd::Ls { digest, path, recursive, action, remote } => {
            let digest = remote.digest(&digest)?;
            match (action, path) {
                (true, path) => cli::action::ls(&remote, &digest, path.as_deref().unwrap_or(""), recursive).await,
                (false, None) => cli::transfer::ls(&remote.store()?, &digest, recursive).await.map_err(CliError::from),
                (false, Some(_)) => Err(usage("a PATH needs --action")),
            }
        }
        Cmd::Cat { digest, path, action, remote } => {
            let digest = remote.digest(&digest)?;
            match (action, path) {
                (true, Some(path)) => cli::action::cat(&remote, &digest, &path).await,
                (true, None) => Err(usage("--action needs a PATH (stdout, outputs/...)")),
                (false, None) => cli::transfer::cat(&remote.store()?, &digest).await.map_err(CliError::from),
                (false, Some(_)) => Err(usage("a PATH needs --action")),
            }
        }
    };
    done.map(|()| 0)
}
