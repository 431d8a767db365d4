//! casfs: a content-addressed virtual filesystem, executor and REAPI endpoint for remote builds.
//!
//! The crate is organised around one store abstraction ([`cas::Cas`], [`cas::ActionCache`]);
//! every consumer (the CLI transfers, the embedded [`server`], later the mount and executor)
//! takes it, so local and remote storage are interchangeable.
//!
//! ```no_run
//! # async fn demo() -> casfs::error::Result<()> {
//! use casfs::cas::{Cas, GrpcStore, RemoteConfig};
//! let store = GrpcStore::new(&RemoteConfig::new("grpc://127.0.0.1:8980"))?;
//! let tree = casfs::transfer::upload_dir(&store, std::path::Path::new("src"), false).await?;
//! println!("root Directory: {}", tree.root);
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
