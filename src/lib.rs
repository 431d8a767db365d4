//! casfs: a content-addressed virtual filesystem, executor and REAPI endpoint for remote builds.
//!
//! # The map
//! Imports flow one way, top to bottom (`scripts/check-structure` fails on a circle):
//!
//! | module | owns |
//! |---|---|
//! | [`server`] | tonic services over any store: CAS, ByteStream, ActionCache, Capabilities, Execution (with an in-process scheduler) |
//! | [`worker`] | the executor fed by leases from an external scheduler (Remote Workers API / BuildGrid) |
//! | [`exec`] | the executor: validate an Action, make its input root, sandbox the command, capture and upload outputs; [`exec::CachedExecutor`] adds the action cache |
//! | [`fs`] | the lazy read-only filesystem: one [`fs::Node`] type, namespaces as [`fs::node::Folder`]s (the digest tree, the browse view), the one fuser adapter, the mount lifecycle |
//! | [`cache`] | the local blob cache of mounts, runs and workers: memory, memory files, packs, blob files behind one [`cache::LocalCache`] |
//! | [`cas`] | the store contracts ([`cas::Cas`], [`cas::ActionCache`]) and their backends: memory, disk, gRPC; the access-log decorator; the Execution client |
//! | [`transfer`] | upload and download of whole trees |
//! | [`tree`] | validated Directory messages; canonical trees built from local folders |
//! | [`render`] | JSON renderings of Action, Command and ActionResult |
//! | [`error`] | the error type, its one map to gRPC codes and its one map to errno |
//! | [`digest`] | digests, their text forms, hashing |
//! | [`proto`] | generated protobuf and gRPC code (from `proto/`) |
//! | [`metrics`] | counters and histograms, served as Prometheus text |
//!
//! See `ARCHITECTURE.md` at the root for what each room owns and where new things go.
//!
//! # Embedding casfs
//! Three ways in, each a few lines.
//!
//! **Upload a tree** and get its root Directory digest:
//! ```no_run
//! # async fn demo() -> casfs::Result<()> {
//! use casfs::cas::{GrpcStore, RemoteConfig};
//! let store = GrpcStore::new(&RemoteConfig::new("grpc://127.0.0.1:8980"))?;
//! let tree = casfs::transfer::upload_dir(&store, std::path::Path::new("src"), false).await?;
//! println!("root Directory: {}", tree.root);
//! # Ok(()) }
//! ```
//!
//! **Mount a digest** lazily (root, `/dev/fuse`), through a local blob cache:
//! ```no_run
//! # async fn demo(root: casfs::Digest) -> casfs::Result<()> {
//! use std::sync::Arc;
//! use casfs::cache::{CacheConfig, LocalCache};
//! use casfs::cas::{GrpcStore, RemoteConfig};
//! use casfs::fs::{MountConfig, Remote, Root};
//! let store = Arc::new(GrpcStore::new(&RemoteConfig::new("grpc://127.0.0.1:8980"))?);
//! let metrics = casfs::metrics::Metrics::new();
//! let cache = LocalCache::open(&CacheConfig::new("/var/cache/casfs", 10 << 30), &metrics)?;
//! let mount = casfs::fs::mount(
//!     Root::Digest(root, Remote::new(store, None)),
//!     cache.clone(),
//!     MountConfig::new("/mnt/input"),
//!     metrics,
//! )?;
//! // ... read /mnt/input: each file is fetched and verified when first read ...
//! drop(mount);
//! cache.flush();
//! # Ok(()) }
//! ```
//!
//! **Run an action**, looking its result up in the action cache first and writing it
//! after; a worker under an external scheduler uses the bare [`exec::Executor`] instead:
//! ```no_run
//! # async fn demo(action: casfs::Digest) -> casfs::Result<()> {
//! use std::sync::Arc;
//! use casfs::cache::{CacheConfig, LocalCache};
//! use casfs::cas::{GrpcStore, RemoteConfig};
//! use casfs::exec::{CachedExecutor, ExecConfig, Executor, Limits, Materialize, SandboxConfig};
//! let store = Arc::new(GrpcStore::new(&RemoteConfig::new("grpc://127.0.0.1:8980"))?);
//! let metrics = casfs::metrics::Metrics::new();
//! let cache = LocalCache::open(&CacheConfig::new("/var/cache/casfs", 10 << 30), &metrics)?;
//! let cfg = ExecConfig {
//!     materialize: Materialize::Auto,
//!     work_dir: "/var/tmp/casfs-exec".into(),
//!     limits: Limits::default(),
//!     sandbox: SandboxConfig::default(),
//!     worker_name: "my-runner".into(),
//!     fetch: Default::default(),
//! };
//! let exec = Arc::new(Executor::new(store.clone(), cache, cfg, metrics));
//! exec.clean_stale()?;
//! let outcome = CachedExecutor::new(exec, store).execute(action, false).await?;
//! println!("exit code {}, cached: {}", outcome.result.exit_code, outcome.cached);
//! # Ok(()) }
//! ```

pub mod cache;
pub mod cas;
pub mod digest;
pub mod error;
pub mod exec;
pub mod fs;
pub mod metrics;
pub mod proto;
pub mod render;
pub mod server;
pub mod transfer;
pub mod tree;
pub mod worker;

pub use digest::Digest;
pub use error::{Error, Result};
