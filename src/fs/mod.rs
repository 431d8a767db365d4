//! The lazy, verified, read-only filesystem over a Directory digest, and its FUSE mount.
//!
//! `node` is the one node type; `core` is protocol-neutral (no fuser types) and testable
//! without a kernel; `fuse` is the only adapter; `fetch` decides what to fetch and from where;
//! `browse` and `action_view` are the made-up namespaces; `mount` is the lifecycle.

pub mod action_view;
pub mod browse;
pub mod core;
pub mod fetch;
pub mod fuse;
pub mod inode;
pub mod mount;
pub mod node;

pub use self::core::{CasFs, FsConfig};
pub use browse::{Instances, RemoteFactory};
pub use fetch::{FetchConfig, Fetcher, Remote};
pub use fuse::OpenMode;
pub use mount::{mount, MountConfig, MountGuard, Root};
pub use node::{Attr, Kind, Node};
