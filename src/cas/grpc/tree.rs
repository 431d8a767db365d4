//! GetTree for the gRPC client: page streams for the mount's tree prefetch, a whole verified tree.

use std::collections::{HashMap, HashSet};

use super::{missing_or, GrpcStore};
use crate::cas::TreePages;
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::proto::reapi;
use crate::tree::Directory;

impl GrpcStore {
    /// The pages of a GetTree of `root`, each Directory decoded under `root`'s function
    /// (invalid ones left out).
    pub(super) fn tree_page_stream(&self, root: &Digest) -> TreePages {
        let mut client = self.cas();
        let instance = self.instance.clone();
        let root = *root;
        Box::pin(async_stream::try_stream! {
            let mut token = String::new();
            loop {
                let req = reapi::GetTreeRequest {
                    instance_name: instance.clone(),
                    root_digest: Some(root.to_proto()),
                    page_size: 0,
                    page_token: token.clone(),
                    digest_function: root.function().proto_value(),
                };
                let mut stream =
                    client.get_tree(req).await.map_err(|s| missing_or(&root, Error::remote("GetTree", s)))?.into_inner();
                let mut next = String::new();
                while let Some(page) = stream.message().await.map_err(|s| Error::remote("GetTree", s))? {
                    let mut dirs = Vec::with_capacity(page.directories.len());
                    for msg in page.directories {
                        let (d, bytes) = Digest::of_message_with(root.function(), &msg);
                        // An invalid Directory is left out; no parent can name it anyway.
                        if let Ok(dir) = Directory::decode(&d, &bytes) {
                            dirs.push((d, bytes.into(), dir));
                        }
                    }
                    next = page.next_page_token;
                    yield dirs;
                }
                if next.is_empty() {
                    break;
                }
                token = next;
            }
        })
    }
}

impl GrpcStore {
    /// GetTree with paging. Digests are recomputed from each message's canonical encoding and
    /// the result is accepted only if every referenced child is present, so a server that
    /// re-encodes Directories differently falls back to the verified walk.
    pub(super) async fn get_tree_rpc(&self, root: &Digest) -> Result<Vec<(Digest, Directory)>> {
        let mut token = String::new();
        let mut dirs: HashMap<Digest, Directory> = HashMap::new();
        loop {
            let req = reapi::GetTreeRequest {
                instance_name: self.instance.clone(),
                root_digest: Some(root.to_proto()),
                page_size: 0,
                page_token: token.clone(),
                digest_function: root.function().proto_value(),
            };
            let mut stream =
                self.cas().get_tree(req).await.map_err(|s| missing_or(root, Error::remote("GetTree", s)))?.into_inner();
            let mut next = String::new();
            while let Some(page) = stream.message().await.map_err(|s| Error::remote("GetTree", s))? {
                for msg in page.directories {
                    let (d, bytes) = Digest::of_message_with(root.function(), &msg);
                    dirs.insert(d, Directory::decode(&d, &bytes)?);
                }
                next = page.next_page_token;
            }
            if next.is_empty() {
                break;
            }
            token = next;
        }
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        let mut queue = std::collections::VecDeque::from([*root]);
        seen.insert(*root);
        while let Some(d) = queue.pop_front() {
            let dir = dirs.remove(&d).ok_or_else(|| Error::Internal(format!("GetTree lacked {d}")))?;
            for c in &dir.dirs {
                if seen.insert(c.digest) {
                    queue.push_back(c.digest);
                }
            }
            out.push((d, dir));
        }
        Ok(out)
    }
}
