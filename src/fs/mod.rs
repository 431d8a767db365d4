//! The lazy, verified, read-only filesystem over a Directory digest, and its FUSE mount.
//!
//! `node` is the one node type; `core` is protocol-neutral (no fuser types) and testable
//! without a kernel; `fuse` is the only adapter; `fetch` decides what to fetch and from where;
//! `browse` and `action_view` are the made-up namespaces; `mount` is the lifecycle.

pub(crate) mod action_view;
pub mod browse;
pub(crate) mod core;
pub(crate) mod fetch;
pub(crate) mod fuse;
pub(crate) mod inode;
pub mod mount;
pub(crate) mod node;
pub(crate) mod tree_prefetch;

pub use self::core::{CasFs, FsConfig};
pub use browse::{Instances, RemoteFactory};
pub use fetch::{FetchConfig, Fetcher, Remote};
pub use fuse::{OpenMode, NO_OPEN_AFTER};
pub use inode::ROOT;
pub use mount::{mount, MountConfig, MountGuard, Root};
pub use node::{Attr, Kind, Node};
