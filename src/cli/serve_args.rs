//! The flags of `casfs serve`, and the `--instance NAME[=OPTIONS]` they may name.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use casfs::server::AcWrites;

use super::exec_args::ExecArgs;
use super::{default_storage, parse_duration, parse_size};

#[derive(Args)]
pub struct ServeArgs {
    /// Address to listen on: HOST:PORT (port 0 picks one) or unix:PATH.
    #[arg(long, env = "CASFS_LISTEN", default_value = "127.0.0.1:8980")]
    pub(super) listen: String,
    /// Folder holding blobs and action results (created if missing). A blob found corrupt
    /// when read is moved to its quarantine/ folder (the newest 16 kept) and counts as
    /// missing, so the next upload heals it.
    #[arg(long, env = "CASFS_STORAGE", default_value_os_t = default_storage())]
    pub(super) storage: PathBuf,
    /// Bound on stored blob bytes, least recently used evicted first (e.g. 10G; 0 = none).
    #[arg(long, env = "CASFS_STORAGE_SIZE", default_value = "10G", value_parser = parse_size)]
    pub(super) storage_size: u64,
    /// Allow a listen address other than loopback. Without --tls-client-ca or
    /// --auth-token-file anyone who reaches it may read, write and execute (logged as a
    /// warning).
    #[arg(long, env = "CASFS_ALLOW_REMOTE_CLIENTS")]
    pub(super) allow_remote_clients: bool,
    /// Append one line per blob read or written (`read HASH/SIZE`) to this file.
    #[arg(long, env = "CASFS_ACCESS_LOG")]
    pub(super) access_log: Option<PathBuf>,
    /// Serve over TLS with this PEM certificate chain (needs --tls-key).
    #[arg(long, env = "CASFS_TLS_CERT", requires = "tls_key")]
    pub(super) tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "CASFS_TLS_KEY", requires = "tls_cert")]
    pub(super) tls_key: Option<PathBuf>,
    /// Require TLS client certificates signed by this PEM CA bundle (needs --tls-cert).
    #[arg(long, env = "CASFS_TLS_CLIENT_CA", requires = "tls_cert")]
    pub(super) tls_client_ca: Option<PathBuf>,
    /// Require `authorization: Bearer TOKEN` on every call, TOKEN read from this file.
    #[arg(long, env = "CASFS_AUTH_TOKEN_FILE")]
    pub(super) auth_token_file: Option<PathBuf>,
    /// Serve storage only: no Execution service.
    #[arg(long, env = "CASFS_NO_EXECUTION")]
    pub(super) no_execution: bool,
    /// Actions executing at once; more wait in a queue [default: number of cores].
    #[arg(long, env = "CASFS_MAX_CONCURRENT_ACTIONS")]
    pub(super) max_concurrent_actions: Option<usize>,
    /// Actions allowed to wait in the queue before Execute answers RESOURCE_EXHAUSTED.
    #[arg(long, env = "CASFS_MAX_QUEUED_ACTIONS", default_value_t = 10_000)]
    pub(super) max_queued_actions: usize,
    /// How long a finished operation can still be waited on.
    #[arg(long, env = "CASFS_OPERATION_RETENTION", default_value = "10m", value_parser = parse_duration)]
    pub(super) operation_retention: Duration,
    /// Cancel an action once no client has watched its operation for this long (0 = never).
    #[arg(long, env = "CASFS_ABANDON_AFTER", default_value = "30s", value_parser = parse_duration)]
    pub(super) abandon_after: Duration,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9102).
    #[arg(long, env = "CASFS_METRICS_LISTEN")]
    pub(super) metrics_listen: Option<String>,
    /// Abort an upload (DEADLINE_EXCEEDED, its temporary file removed) once its client has
    /// sent less than 64 KiB in this long.
    #[arg(long, env = "CASFS_UPLOAD_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub(super) upload_idle_timeout: Duration,
    /// Who may write the action cache with UpdateActionResult: `all` clients (Bazel's
    /// --remote_upload_local_results) or `none` (only this server's executor records
    /// results; clients get PERMISSION_DENIED).
    #[arg(long, env = "CASFS_AC_WRITES", default_value = "all", value_parser = parse_ac_writes)]
    pub(super) ac_writes: AcWrites,
    /// A blob the server reported present (FindMissingBlobs, an action-cache or Execute cache
    /// hit, a Remote Asset record) is not evicted for this long afterwards; an upload that
    /// would need it gone is refused (RESOURCE_EXHAUSTED) instead. 0 = plain LRU, where
    /// being asked about does not count as a use.
    #[arg(long, env = "CASFS_MIN_BLOB_LIFETIME", default_value = "10m", value_parser = parse_duration)]
    pub(super) min_blob_lifetime: Duration,
    /// Let the Remote Asset Fetch service download URLs that start with this prefix itself
    /// (repeatable, e.g. https://mirror.example/; redirects must stay under an allowed
    /// prefix too). By default it downloads nothing and answers only from records clients
    /// pushed.
    #[arg(long = "asset-fetch", env = "CASFS_ASSET_FETCH", value_delimiter = ',')]
    pub(super) asset_fetch: Vec<String>,
    /// Largest file the Remote Asset Fetch service downloads.
    #[arg(long, env = "CASFS_ASSET_MAX_SIZE", default_value = "4G", value_parser = super::parse_size)]
    pub(super) asset_max_size: u64,
    /// Longest download of the Remote Asset Fetch service (a request may ask for less).
    #[arg(long, env = "CASFS_ASSET_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    pub(super) asset_timeout: Duration,
    #[command(flatten)]
    pub(super) exec: ExecArgs,
    /// Serve this named instance (repeatable): NAME[=OPTION,…] with options storage=DIR (its
    /// folder; default instances/NAME in --storage), shared-cas (blobs in --storage, shared
    /// with the other shared-cas instances; the action cache stays its own), execution or
    /// no-execution, ac-writes=all|none, access-log=FILE, and with --cas upstream=NAME (the
    /// upstream instance it serves; default: its own name). With instances, a request naming
    /// another instance is refused (INVALID_ARGUMENT, listing these); without, one store
    /// serves every instance name.
    #[arg(long = "instance", value_parser = parse_instance)]
    pub(super) instances: Vec<InstanceSpec>,
    /// Serve in front of the store at this URL (grpc://, grpcs://, unix:) instead of local
    /// storage: actions mount their inputs lazily from it through the local blob cache
    /// (--cache-dir), outputs and results go to it; CAS and action-cache calls are passed
    /// on. --instance-name, --remote-header and --tls-ca-file/--tls-client-* apply to it.
    #[arg(long, env = "CASFS_SERVE_CAS")]
    pub(super) cas: Option<String>,
    /// With --cas: the action cache at this URL instead of the --cas store's.
    #[arg(long, env = "CASFS_SERVE_AC", requires = "cas")]
    pub(super) ac: Option<String>,
    #[command(flatten)]
    pub(super) conn: super::ConnArgs,
    #[command(flatten)]
    pub(super) cache: super::CacheArgs,
}

/// One `--instance NAME[=OPTIONS]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceSpec {
    /// The REAPI instance name ("" is the default instance).
    pub name: String,
    /// Its own folder [default: `instances/NAME` in `--storage`].
    pub storage: Option<PathBuf>,
    /// Blobs go to the server's `--storage` CAS, shared with the other `shared-cas`
    /// instances; its action cache stays its own.
    pub shared_cas: bool,
    /// Executes actions (`execution`/`no-execution`) [default: as `--no-execution` says].
    pub execution: Option<bool>,
    /// Who may write its action cache [default: `--ac-writes`].
    pub ac_writes: Option<AcWrites>,
    /// Its own access log [default: `--access-log`].
    pub access_log: Option<PathBuf>,
    /// With `--cas`: the upstream instance it serves [default: its own name].
    pub upstream: Option<String>,
}

/// Parses `NAME[=OPTION,OPTION…]`; options: `storage=DIR`, `shared-cas`, `execution`,
/// `no-execution`, `ac-writes=all|none`, `access-log=FILE`, `upstream=NAME` (with `--cas`).
pub fn parse_instance(text: &str) -> Result<InstanceSpec, String> {
    let (name, opts) = text.split_once('=').unwrap_or((text, ""));
    casfs::server::check_instance_name(name).map_err(|e| e.to_string())?;
    let mut spec = InstanceSpec {
        name: name.to_string(),
        storage: None,
        shared_cas: false,
        execution: None,
        ac_writes: None,
        access_log: None,
        upstream: None,
    };
    for opt in opts.split(',').filter(|o| !o.is_empty()) {
        let (key, value) = opt.split_once('=').unwrap_or((opt, ""));
        match (key, value) {
            ("storage", v) if !v.is_empty() => spec.storage = Some(PathBuf::from(v)),
            ("access-log", v) if !v.is_empty() => spec.access_log = Some(PathBuf::from(v)),
            ("upstream", v) => {
                casfs::server::check_instance_name(v).map_err(|e| e.to_string())?;
                spec.upstream = Some(v.to_string());
            }
            ("shared-cas", "") => spec.shared_cas = true,
            ("execution", "") => spec.execution = Some(true),
            ("no-execution", "") => spec.execution = Some(false),
            ("ac-writes", v) => spec.ac_writes = Some(v.parse().map_err(|_| format!("ac-writes={v:?}: all or none"))?),
            _ => {
                return Err(format!(
                    "instance {name:?}: unknown option {opt:?} (storage=DIR, shared-cas, execution, \
                     no-execution, ac-writes=all|none, access-log=FILE, upstream=NAME)"
                ))
            }
        }
    }
    if spec.shared_cas && spec.storage.is_some() {
        return Err(format!("instance {name:?}: shared-cas and storage= exclude each other"));
    }
    Ok(spec)
}

fn parse_ac_writes(s: &str) -> Result<AcWrites, String> {
    s.parse().map_err(|_| format!("{s:?}: expected all or none"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_specs() {
        let s = parse_instance("a").unwrap();
        assert_eq!((s.name.as_str(), s.shared_cas, s.execution), ("a", false, None));
        let s = parse_instance("team/b=shared-cas,no-execution,ac-writes=none").unwrap();
        assert!(s.shared_cas && s.execution == Some(false) && s.ac_writes == Some(AcWrites::None));
        assert_eq!(parse_instance("=storage=/x").unwrap().storage, Some(PathBuf::from("/x")));
        for bad in ["../x", "a=bogus", "a=storage=", "a=shared-cas,storage=/x", "blobs", "a=ac-writes=some"] {
            assert!(parse_instance(bad).is_err(), "{bad:?} accepted");
        }
    }
}
