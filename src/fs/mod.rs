//! The lazy, verified, read-only filesystem over a Directory digest, and its FUSE mount.
//!
//! `core` is protocol-neutral (no fuser types) and testable without a kernel; `fuse` is the
//! only adapter; `fetch` holds the caches; `mount` the lifecycle.

pub mod browse;
pub mod core;
pub mod fetch;
pub mod fuse;
pub mod hot;
pub mod inode;
pub mod large;
pub mod mount;
pub mod render;
pub mod vdir;

pub use self::core::{CasFs, FsConfig};
pub use fetch::{FetchConfig, Fetcher, Remote, RemoteFactory, Remotes};
pub use fuse::OpenMode;
pub use mount::{mount, MountConfig, MountGuard, Root};
