//! The browse-by-digest namespace: `<instance>/blobs/<function>/{directory,file,executable,
//! tree,command}/<hash>-<size>` and `<instance>/actions/<function>/<hash>-<size>/`, as
//! [`Folder`]s (function: sha256, sha1, md5, sha384, sha512, blake3).
//!
//! Digest folders are not listable (they show a README); a well-formed name resolves lazily;
//! a malformed or absent one is ENOENT; content that is not what its folder promises is EIO.

use std::sync::{Arc, RwLock};

use prost::Message;

use super::action_view;
use super::fetch::{Fetcher, Remote};
use super::node::{Folder, Node, VDir};
use crate::digest::{Digest, DigestFunction};
use crate::error::{Error, Result};
use crate::proto::reapi;
use crate::render;
use crate::tree::check_name;

/// The name that stands for the default (empty) instance.
pub const DEFAULT_INSTANCE: &str = "_";

/// Most instances one mount talks to.
const MAX_INSTANCES: usize = 256;

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

Each digest function has its folder beside sha256: sha1, md5, sha384, sha512, blake3.
<instance> is the REAPI instance name, with '/' separating nested names; the default
(empty) instance is '_'. Digest folders cannot be listed: name a digest to open it.
Reading checks every blob against its digest.
";

/// Makes the `Remote` of an instance name.
pub type RemoteFactory = Arc<dyn Fn(&str) -> Result<Remote> + Send + Sync>;

/// The instances a browse namespace reads from, connected on first use.
pub struct Instances {
    list: RwLock<Vec<(String, Arc<Remote>)>>,
    factory: Option<RemoteFactory>,
}

impl Instances {
    /// Only the default instance, served by `remote`.
    pub fn single(remote: Arc<Remote>) -> Self {
        Instances { list: RwLock::new(vec![(String::new(), remote)]), factory: None }
    }

    /// Every instance name, each made by `factory` when first browsed.
    pub fn on_demand(factory: RemoteFactory) -> Self {
        Instances { list: RwLock::new(Vec::new()), factory: Some(factory) }
    }

    /// The remote of instance `name`, connecting on first use.
    fn get(&self, name: &str) -> Result<Arc<Remote>> {
        let find = |list: &[(String, Arc<Remote>)]| list.iter().find(|(n, _)| n == name).map(|(_, r)| r.clone());
        if let Some(r) = find(&self.list.read().unwrap_or_else(|e| e.into_inner())) {
            return Ok(r);
        }
        let factory = self.factory.as_ref().ok_or_else(|| Error::NotFound(format!("instance {name:?}")))?;
        let remote = Arc::new(factory(name)?);
        let mut list = self.list.write().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = find(&list) {
            return Ok(r);
        }
        if list.len() >= MAX_INSTANCES {
            return Err(Error::ResourceExhausted(format!("more than {MAX_INSTANCES} instances browsed")));
        }
        list.push((name.to_string(), remote.clone()));
        Ok(remote)
    }
}

/// What every folder of one browse namespace shares.
struct Ctx {
    fetch: Arc<Fetcher>,
    instances: Instances,
}

/// Where in the namespace a folder is.
#[derive(Clone)]
enum Place {
    /// The mount's root: one folder per instance (`_` is the default instance).
    Root,
    /// An instance name, or a prefix of a nested one (`a` of `a/b`).
    Instance(Arc<str>),
    /// `<instance>/blobs`.
    Blobs(Arc<Remote>),
    /// `<instance>/blobs/<function>` (sha256, blake3, ...).
    BlobFunction(Arc<Remote>, DigestFunction),
    /// `<instance>/blobs/<function>/<category>`.
    Category(Arc<Remote>, DigestFunction, Category),
    /// `<instance>/actions`.
    Actions(Arc<Remote>),
    /// `<instance>/actions/<function>`.
    ActionFunction(Arc<Remote>, DigestFunction),
}

struct BrowseFolder {
    ctx: Arc<Ctx>,
    place: Place,
}

/// The root of the browse namespace over `instances`.
pub fn root(fetch: Arc<Fetcher>, instances: Instances) -> Node {
    folder(&Arc::new(Ctx { fetch, instances }), Place::Root)
}

fn folder(ctx: &Arc<Ctx>, place: Place) -> Node {
    Node::Folder(Arc::new(BrowseFolder { ctx: ctx.clone(), place }))
}

fn parse_digest_name(f: DigestFunction, name: &str) -> Result<Digest> {
    let (hash, size) = name.rsplit_once('-').ok_or_else(|| Error::NotFound(format!("{name:?} is not HASH-SIZE")))?;
    let size: i64 = size.parse().map_err(|_| Error::NotFound(format!("{name:?}: bad size")))?;
    Digest::from_parts_with(f, hash, size).map_err(|e| Error::NotFound(format!("{name:?}: {e}")))
}

/// A missing blob is "no such name" here; anything else keeps its meaning.
fn absent_is_enoent(e: Error) -> Error {
    match e.missing_blob() {
        Some(d) => Error::NotFound(d.to_string()),
        None => e,
    }
}

impl BrowseFolder {
    fn readme() -> (String, Node) {
        ("README".into(), Node::text(README))
    }

    fn instance(&self, name: &str) -> Node {
        folder(&self.ctx, Place::Instance(Arc::from(name)))
    }

    async fn category_entry(&self, remote: &Arc<Remote>, c: Category, d: Digest) -> Result<Node> {
        let fetch = &self.ctx.fetch;
        match c {
            Category::File | Category::Executable => {
                if !fetch.exists(d, remote).await? {
                    return Err(Error::NotFound(d.to_string()));
                }
                Ok(Node::File { digest: d, executable: c == Category::Executable, remote: remote.clone() })
            }
            Category::Directory => {
                fetch.dir(d, remote).await.map_err(absent_is_enoent)?;
                Ok(Node::Dir { digest: d, remote: remote.clone() })
            }
            Category::Tree => {
                let root = action_view::load_tree(fetch, d, remote).await.map_err(absent_is_enoent)?;
                Ok(Node::Dir { digest: root, remote: remote.clone() })
            }
            Category::Command => {
                let bytes = fetch.message(d, remote).await.map_err(absent_is_enoent)?;
                let cmd = reapi::Command::decode(bytes.as_slice()).map_err(|e| Error::InvalidDirectory {
                    digest: d.to_string(),
                    reason: format!("not a Command message: {e}"),
                })?;
                Ok(Node::text(render::command_json(&cmd)))
            }
        }
    }
}

#[async_trait::async_trait]
impl Folder for BrowseFolder {
    fn list_now(&self) -> Option<VDir> {
        let ctx = &self.ctx;
        let entries = match &self.place {
            Place::Root => vec![Self::readme(), (DEFAULT_INSTANCE.into(), self.instance(""))],
            // Listing an instance connects to it.
            Place::Instance(_) => return None,
            Place::Blobs(r) => DigestFunction::ALL
                .iter()
                .map(|f| (f.name().into(), folder(ctx, Place::BlobFunction(r.clone(), *f))))
                .collect(),
            Place::BlobFunction(r, f) => CATEGORIES
                .iter()
                .map(|(name, c)| (name.to_string(), folder(ctx, Place::Category(r.clone(), *f, *c))))
                .collect(),
            Place::Actions(r) => DigestFunction::ALL
                .iter()
                .map(|f| (f.name().into(), folder(ctx, Place::ActionFunction(r.clone(), *f))))
                .collect(),
            Place::Category(..) | Place::ActionFunction(..) => vec![Self::readme()],
        };
        Some(entries.into_iter().collect())
    }

    async fn list(&self) -> Result<VDir> {
        if let Some(l) = self.list_now() {
            return Ok(l);
        }
        let Place::Instance(name) = &self.place else { return Err(Error::Internal("unlistable folder".into())) };
        let r = self.ctx.instances.get(name)?;
        Ok([
            ("actions".to_string(), folder(&self.ctx, Place::Actions(r.clone()))),
            ("blobs".to_string(), folder(&self.ctx, Place::Blobs(r))),
        ]
        .into_iter()
        .collect())
    }

    async fn lookup(&self, name: &str) -> Result<Node> {
        let absent = || Error::NotFound(name.to_string());
        let fixed = || self.list_now().and_then(|l| l.get(name).cloned());
        match &self.place {
            Place::Root => {
                if name == DEFAULT_INSTANCE {
                    return Ok(self.instance(""));
                }
                if let Some(n) = fixed() {
                    return Ok(n);
                }
                check_name(name).map_err(|_| absent())?;
                Ok(self.instance(name))
            }
            Place::Instance(prefix) => match name {
                "blobs" | "actions" => self.list().await?.get(name).cloned().ok_or_else(absent),
                _ if prefix.is_empty() => Err(absent()),
                _ => {
                    check_name(name).map_err(|_| absent())?;
                    Ok(self.instance(&format!("{prefix}/{name}")))
                }
            },
            Place::Blobs(_) | Place::Actions(_) => {
                DigestFunction::from_name(name).ok_or_else(absent)?;
                fixed().ok_or_else(absent)
            }
            Place::BlobFunction(..) => fixed().ok_or_else(absent),
            Place::Category(remote, f, c) => match name {
                "README" => Ok(Node::text(README)),
                _ => self.category_entry(remote, *c, parse_digest_name(*f, name)?).await,
            },
            Place::ActionFunction(remote, f) => {
                if name == "README" {
                    return Ok(Node::text(README));
                }
                let d = parse_digest_name(*f, name)?;
                let fetch = &self.ctx.fetch;
                let r = fetch.action_result(d, remote).await?.ok_or_else(absent)?;
                Ok(Node::Virtual(Arc::new(action_view::action_dir(fetch, d, &r, remote).await)))
            }
        }
    }
}
