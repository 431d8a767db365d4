//! The browse-by-digest namespace: `<instance>/blobs/sha256/{directory,file,executable,tree,
//! command}/<hash>-<size>` and `<instance>/actions/sha256/<hash>-<size>/`.
//!
//! Digest folders are not listable (they show a README); a well-formed name resolves lazily;
//! a malformed or absent one is ENOENT; content that is not what its folder promises is EIO.

use std::sync::Arc;

use prost::Message;

use super::fetch::Fetcher;
use super::inode::NodeKind;
use super::{render, vdir};
use crate::digest::{Digest, DigestFunction};
use crate::error::{Error, Result};
use crate::proto::reapi;
use crate::tree::check_name;

/// The name that stands for the default (empty) instance.
pub const DEFAULT_INSTANCE: &str = "_";

/// What a blob folder presents its digests as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Category {
    /// The tree of a Directory digest.
    Directory,
    /// A blob as a plain file.
    File,
    /// A blob as an executable file.
    Executable,
    /// A REAPI Tree message as a directory tree.
    Tree,
    /// A Command message rendered as JSON.
    Command,
}

const CATEGORIES: [(&str, Category); 5] = [
    ("command", Category::Command),
    ("directory", Category::Directory),
    ("executable", Category::Executable),
    ("file", Category::File),
    ("tree", Category::Tree),
];

/// A folder of the namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BrowseNode {
    /// The mount's root: one folder per instance (`_` is the default instance).
    Root,
    /// An instance name, or a prefix of a nested one (`a` of `a/b`).
    Instance(Arc<str>),
    /// `<instance>/blobs`.
    Blobs(u16),
    /// `<instance>/blobs/sha256`.
    BlobFunction(u16),
    /// `<instance>/blobs/sha256/<category>`.
    Category(u16, Category),
    /// `<instance>/actions`.
    Actions(u16),
    /// `<instance>/actions/sha256`.
    ActionFunction(u16),
}

/// The README shown in the root and in every digest folder.
pub const README: &str = "\
casfs browse mount: content-addressed storage and the action cache, by digest.

  <instance>/blobs/sha256/directory/<hash>-<size>/   the tree of a Directory
  <instance>/blobs/sha256/file/<hash>-<size>         a blob as a file (0444)
  <instance>/blobs/sha256/executable/<hash>-<size>   a blob as an executable (0555)
  <instance>/blobs/sha256/tree/<hash>-<size>/        a REAPI Tree message as a tree
  <instance>/blobs/sha256/command/<hash>-<size>      a Command message as JSON
  <instance>/actions/sha256/<hash>-<size>/           the cached result of an action:
      exit_code, stdout, stderr, action_result.json, action.json, command.json, outputs/

<instance> is the REAPI instance name, with '/' separating nested names; the default
(empty) instance is '_'. Digest folders cannot be listed: name a digest to open it.
Reading checks every blob against its digest.
";

fn synth(text: &str) -> NodeKind {
    NodeKind::Synth { data: Arc::from(text.as_bytes()), executable: false }
}

fn node(n: BrowseNode, parent: u64) -> NodeKind {
    NodeKind::Browse { node: n, parent }
}

/// The entries a namespace folder lists.
pub fn children(n: &BrowseNode, ino: u64) -> Vec<(String, NodeKind)> {
    match n {
        BrowseNode::Root => vec![
            ("README".into(), synth(README)),
            (DEFAULT_INSTANCE.into(), node(BrowseNode::Instance(Arc::from("")), ino)),
        ],
        BrowseNode::Instance(_) => Vec::new(),
        BrowseNode::Blobs(i) => vec![("sha256".into(), node(BrowseNode::BlobFunction(*i), ino))],
        BrowseNode::BlobFunction(i) => {
            CATEGORIES.iter().map(|(name, c)| (name.to_string(), node(BrowseNode::Category(*i, *c), ino))).collect()
        }
        BrowseNode::Actions(i) => vec![("sha256".into(), node(BrowseNode::ActionFunction(*i), ino))],
        BrowseNode::Category(..) | BrowseNode::ActionFunction(_) => vec![("README".into(), synth(README))],
    }
}

/// The listing of an instance folder (needs the instance number, so it may connect).
pub fn instance_children(fetch: &Fetcher, name: &str, ino: u64) -> Result<Vec<(String, NodeKind)>> {
    let i = fetch.remotes().index_of(name)?;
    Ok(vec![("actions".into(), node(BrowseNode::Actions(i), ino)), ("blobs".into(), node(BrowseNode::Blobs(i), ino))])
}

fn parse_digest_name(name: &str) -> Result<Digest> {
    let (hash, size) = name.rsplit_once('-').ok_or_else(|| Error::NotFound(format!("{name:?} is not HASH-SIZE")))?;
    let size: i64 = size.parse().map_err(|_| Error::NotFound(format!("{name:?}: bad size")))?;
    Digest::from_parts(hash, size).map_err(|e| Error::NotFound(format!("{name:?}: {e}")))
}

/// Resolves `name` in a namespace folder. Fixed names resolve without I/O; digest names
/// are checked against the CAS or the action cache.
pub async fn lookup(fetch: &Arc<Fetcher>, n: &BrowseNode, ino: u64, name: &str) -> Result<NodeKind> {
    let absent = || Error::NotFound(name.to_string());
    match n {
        BrowseNode::Root => {
            if name == DEFAULT_INSTANCE {
                return Ok(node(BrowseNode::Instance(Arc::from("")), ino));
            }
            children(n, ino).into_iter().find(|(c, _)| c == name).map(|(_, k)| k).map_or_else(
                || {
                    check_name(name).map_err(|_| absent())?;
                    Ok(node(BrowseNode::Instance(Arc::from(name)), ino))
                },
                Ok,
            )
        }
        BrowseNode::Instance(prefix) => match name {
            "blobs" | "actions" => {
                let i = fetch.remotes().index_of(prefix)?;
                Ok(node(if name == "blobs" { BrowseNode::Blobs(i) } else { BrowseNode::Actions(i) }, ino))
            }
            _ if prefix.is_empty() => Err(absent()),
            _ => {
                check_name(name).map_err(|_| absent())?;
                Ok(node(BrowseNode::Instance(Arc::from(format!("{prefix}/{name}"))), ino))
            }
        },
        BrowseNode::Blobs(_) | BrowseNode::BlobFunction(_) | BrowseNode::Actions(_) => {
            if DigestFunction::from_name(name).is_none() && matches!(n, BrowseNode::Blobs(_) | BrowseNode::Actions(_)) {
                return Err(absent());
            }
            children(n, ino).into_iter().find(|(c, _)| c == name).map(|(_, k)| k).ok_or_else(absent)
        }
        BrowseNode::Category(i, c) => {
            if name == "README" {
                return Ok(synth(README));
            }
            let d = parse_digest_name(name)?;
            category_entry(fetch, *i, *c, d, ino).await
        }
        BrowseNode::ActionFunction(i) => {
            if name == "README" {
                return Ok(synth(README));
            }
            let d = parse_digest_name(name)?;
            let r = fetch.action_result(d, *i).await?.ok_or_else(absent)?;
            let view = vdir::action_dir(fetch, d, &r, *i).await;
            Ok(NodeKind::Virtual { dir: Arc::new(view), parent: ino, inst: *i })
        }
    }
}

/// A missing blob is "no such name" here; anything else keeps its meaning.
fn absent_is_enoent(e: Error) -> Error {
    match e {
        Error::MissingBlob(d) => Error::NotFound(d.to_string()),
        e => e,
    }
}

async fn category_entry(fetch: &Arc<Fetcher>, inst: u16, c: Category, d: Digest, ino: u64) -> Result<NodeKind> {
    match c {
        Category::File | Category::Executable => {
            if !fetch.exists(d, inst).await? {
                return Err(Error::NotFound(d.to_string()));
            }
            Ok(NodeKind::File { digest: d, executable: c == Category::Executable, inst })
        }
        Category::Directory => {
            fetch.dir(d, inst).await.map_err(|e| absent_is_enoent(super::core::shared_err(&e)))?;
            Ok(NodeKind::Dir { digest: d, parent: ino, inst })
        }
        Category::Tree => {
            let root = vdir::load_tree(fetch, d, inst).await.map_err(absent_is_enoent)?;
            Ok(NodeKind::Dir { digest: root, parent: ino, inst })
        }
        Category::Command => {
            let bytes = fetch.message(d, inst).await.map_err(absent_is_enoent)?;
            let cmd = reapi::Command::decode(bytes.as_slice()).map_err(|e| Error::InvalidDirectory {
                digest: d.to_string(),
                reason: format!("not a Command message: {e}"),
            })?;
            Ok(synth(&render::command_json(&cmd)))
        }
    }
}
