//! The view of one ActionResult as a made-up directory: exit code, stdout, stderr, JSON
//! renderings, and its outputs laid out at their paths.

use std::collections::BTreeMap;
use std::sync::Arc;

use prost::Message;

use super::fetch::{Fetcher, Remote};
use super::node::{Node, VDir};
use crate::digest::{Digest, DigestFunction};
use crate::error::{Error, Result};
use crate::proto::reapi;
use crate::render;
use crate::tree::{check_name, Directory};

/// A mutable tree used while laying outputs out.
#[derive(Default)]
struct Builder {
    entries: BTreeMap<String, Slot>,
}

enum Slot {
    Leaf(Node),
    Dir(Builder),
}

impl Builder {
    /// Places `node` at a relative path; refuses paths with empty, `.` or `..` parts and
    /// paths that cross an existing leaf.
    fn insert(&mut self, path: &str, node: Node) -> std::result::Result<(), String> {
        let parts: Vec<&str> = path.split('/').collect();
        for p in &parts {
            check_name(p)?;
        }
        let (last, dirs) = parts.split_last().ok_or("empty path")?;
        let mut cur = self;
        for d in dirs {
            let slot = cur.entries.entry(d.to_string()).or_insert_with(|| Slot::Dir(Builder::default()));
            cur = match slot {
                Slot::Dir(b) => b,
                Slot::Leaf(_) => return Err(format!("{path:?} crosses another output")),
            };
        }
        cur.entries.insert(last.to_string(), Slot::Leaf(node));
        Ok(())
    }

    fn build(self) -> VDir {
        self.entries
            .into_iter()
            .map(|(k, v)| {
                let n = match v {
                    Slot::Leaf(n) => n,
                    Slot::Dir(b) => Node::Virtual(Arc::new(b.build())),
                };
                (k, n)
            })
            .collect()
    }
}

/// A digest of an action's messages, read under the action's function `f`.
fn digest_of(f: DigestFunction, d: &Option<reapi::Digest>) -> Option<Digest> {
    d.as_ref().and_then(|d| Digest::from_proto_with(f, d).ok())
}

/// Decodes and validates a REAPI Tree, registers its Directories with the fetcher (so they
/// can be browsed by digest even though the CAS need not hold them one by one), and returns
/// the root Directory's digest.
pub async fn load_tree(fetch: &Arc<Fetcher>, tree: Digest, remote: &Arc<Remote>) -> Result<Digest> {
    let bytes = fetch.message(tree, remote).await?;
    let msg = reapi::Tree::decode(bytes.as_slice()).map_err(|e| Error::InvalidDirectory {
        digest: tree.to_string(),
        reason: format!("not a Tree message: {e}"),
    })?;
    let root = msg
        .root
        .ok_or_else(|| Error::InvalidDirectory { digest: tree.to_string(), reason: "Tree without root".into() })?;
    let mut root_digest = None;
    for (i, d) in std::iter::once(root).chain(msg.children).enumerate() {
        let encoded = d.encode_to_vec();
        let digest = Digest::of_bytes_with(tree.function(), &encoded);
        let dir = Directory::decode(&digest, &encoded).map_err(|e| match e {
            Error::InvalidDirectory { reason, .. } => {
                Error::InvalidDirectory { digest: format!("{tree} entry {i}"), reason }
            }
            e => e,
        })?;
        fetch.insert_dir(digest, encoded.into(), dir).await?;
        root_digest.get_or_insert(digest);
    }
    root_digest.ok_or_else(|| Error::Internal("tree root vanished".into()))
}

/// Lays an ActionResult's outputs out at their paths. Outputs that cannot be shown (a bad
/// path, a missing Tree) are left out and logged; the rest stays browsable.
/// Digests are read under `f`, the action's function.
pub async fn outputs(fetch: &Arc<Fetcher>, f: DigestFunction, r: &reapi::ActionResult, remote: &Arc<Remote>) -> VDir {
    let mut b = Builder::default();
    let mut place = |path: &str, node: Node| {
        if let Err(why) = b.insert(path, node) {
            tracing::warn!(path, why, "leaving an output out of the browse view");
        }
    };
    for file in &r.output_files {
        if let Some(digest) = digest_of(f, &file.digest) {
            place(&file.path, Node::File { digest, executable: file.is_executable, remote: remote.clone() });
        }
    }
    for s in r.output_symlinks.iter().chain(&r.output_file_symlinks).chain(&r.output_directory_symlinks) {
        place(&s.path, Node::Symlink(Arc::from(s.target.as_str())));
    }
    for d in &r.output_directories {
        let root = match (digest_of(f, &d.root_directory_digest), digest_of(f, &d.tree_digest)) {
            (Some(root), _) => Ok(root),
            (None, Some(tree)) => load_tree(fetch, tree, remote).await,
            (None, None) => Err(Error::InvalidArgument("output directory without a digest".into())),
        };
        match root {
            Ok(root) => place(&d.path, Node::Dir { digest: root, remote: remote.clone() }),
            Err(e) => tracing::warn!(path = %d.path, error = %e, "cannot show an output directory"),
        }
    }
    b.build()
}

/// The browse view of one action: `exit_code`, `stdout`, `stderr`, `action_result.json`,
/// `action.json` and `command.json` (when the CAS holds them), and `outputs/`.
pub async fn action_dir(fetch: &Arc<Fetcher>, action: Digest, r: &reapi::ActionResult, remote: &Arc<Remote>) -> VDir {
    let mut e = BTreeMap::new();
    e.insert("exit_code".to_string(), Node::text(format!("{}\n", r.exit_code)));
    for (name, raw, d) in [("stdout", &r.stdout_raw, &r.stdout_digest), ("stderr", &r.stderr_raw, &r.stderr_digest)] {
        let node = match digest_of(action.function(), d) {
            Some(digest) if raw.is_empty() => Node::File { digest, executable: false, remote: remote.clone() },
            _ => Node::text(raw.to_vec()),
        };
        e.insert(name.to_string(), node);
    }
    e.insert("action_result.json".to_string(), Node::text(render::action_result_json(r)));
    if let Ok(bytes) = fetch.message(action, remote).await {
        if let Ok(a) = reapi::Action::decode(bytes.as_slice()) {
            e.insert("action.json".to_string(), Node::text(render::action_json(&a)));
            if let Some(cd) = digest_of(action.function(), &a.command_digest) {
                match fetch.message(cd, remote).await.map(|b| reapi::Command::decode(b.as_slice())) {
                    Ok(Ok(c)) => {
                        e.insert("command.json".to_string(), Node::text(render::command_json(&c)));
                    }
                    _ => tracing::info!(command = %cd, "command of a browsed action is not readable"),
                }
            }
        }
    }
    e.insert("outputs".to_string(), Node::Virtual(Arc::new(outputs(fetch, action.function(), r, remote).await)));
    VDir::new(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_places_nested_paths_and_refuses_bad_ones() {
        let mut b = Builder::default();
        let f = Node::text("x");
        b.insert("a/b/c", f.clone()).unwrap();
        b.insert("a/d", f.clone()).unwrap();
        assert!(b.insert("../x", f.clone()).is_err());
        assert!(b.insert("a//x", f.clone()).is_err());
        assert!(b.insert("a/b/c/d", f.clone()).is_err());
        let v = b.build();
        let Some(Node::Virtual(a)) = v.get("a") else { panic!("a is a dir") };
        assert_eq!(a.len(), 2);
    }
}
