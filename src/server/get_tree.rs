//! GetTree: a Directory tree streamed breadth-first in pages of bounded size, in one pass.
//!
//! A client may ask for any `page_size` (2^31 included) and any `page_token`; neither makes
//! the server hold more than one page and one level's digests. Every page the stream sends
//! carries the token of the next one, so a broken stream resumes where it stopped; all pages
//! of a tree come in one call, so a tree is walked once, not once per page.

use std::collections::{HashSet, VecDeque};
use std::pin::Pin;

use futures::Stream;
use prost::Message;
use tonic::Status;

use super::{status, MAX_BATCH_BYTES};
use crate::cas::SharedCas;
use crate::digest::Digest;
use crate::proto::reapi;

/// Directories per page when the client does not say, and the most it may ask for.
pub(super) const MAX_TREE_PAGE: usize = 1000;
/// Encoded bytes of Directories per page: a page fits the 4 MiB message limit of clients.
const PAGE_BYTES: usize = 2 << 20;
/// Directories bigger than this are never read: no client could receive them in a batch or
/// a page (they are left out, as absent subtrees are).
pub(super) const MAX_DIRECTORY_BYTES: u64 = MAX_BATCH_BYTES;
/// Directories read from the store at once while walking, and their most bytes.
const READ_AT_ONCE: usize = 256;
const READ_BYTES: u64 = 8 << 20;

/// The stream GetTree answers with.
pub(super) type TreeStream = Pin<Box<dyn Stream<Item = Result<reapi::GetTreeResponse, Status>> + Send>>;

/// Where a GetTree call starts and how big its pages are, from the request's fields.
pub(super) struct Paging {
    /// Directories (in walk order) to leave out: the resume point of `page_token`.
    pub skip: u64,
    /// Directories per page, at least 1 and at most [`MAX_TREE_PAGE`].
    pub page: usize,
}

impl Paging {
    /// Reads `page_size` (0 or negative: the default) and `page_token` (empty: the start).
    pub fn new(page_size: i32, page_token: &str) -> Result<Self, Status> {
        let page = if page_size > 0 { (page_size as usize).min(MAX_TREE_PAGE) } else { MAX_TREE_PAGE };
        let skip = if page_token.is_empty() {
            0
        } else {
            page_token.parse().map_err(|_| Status::invalid_argument(format!("bad page_token {page_token:?}")))?
        };
        Ok(Paging { skip, page })
    }
}

/// Streams the tree under `root` (whose bytes were already read) breadth-first from
/// `paging.skip`. Absent, oversized or undecodable subtrees are left out, as the spec allows.
pub(super) fn stream(cas: SharedCas, root: Digest, root_bytes: bytes::Bytes, paging: Paging) -> TreeStream {
    Box::pin(async_stream::try_stream! {
        let mut seen = HashSet::from([root]);
        // Digests still to read, in walk order (breadth-first: a queue).
        let mut level: VecDeque<Digest> = VecDeque::new();
        let mut pos: u64 = 0;
        let mut page: Vec<reapi::Directory> = Vec::new();
        let mut page_bytes = 0usize;
        let mut pending = vec![(root, root_bytes)];
        loop {
            let mut next = Vec::new();
            for (d, bytes) in pending.drain(..) {
                let Ok(msg) = reapi::Directory::decode(bytes.as_ref()) else {
                    tracing::info!(digest = %d, "GetTree: skipping an undecodable Directory");
                    continue;
                };
                for c in &msg.directories {
                    if let Some(Ok(cd)) = c.digest.as_ref().map(|c| Digest::from_proto_with(d.function(), c)) {
                        if cd.size() <= MAX_DIRECTORY_BYTES && seen.insert(cd) {
                            next.push(cd);
                        }
                    }
                }
                pos += 1;
                if pos <= paging.skip {
                    continue;
                }
                let len = bytes.len();
                if !page.is_empty() && (page.len() >= paging.page || page_bytes + len > PAGE_BYTES) {
                    // `pos - 1` directories come before this one: the next page starts here.
                    let token = (pos - 1).to_string();
                    yield reapi::GetTreeResponse { directories: std::mem::take(&mut page), next_page_token: token };
                    page_bytes = 0;
                }
                page_bytes += len;
                page.push(msg);
            }
            level.extend(next);
            if level.is_empty() {
                break;
            }
            let mut batch = Vec::new();
            let mut batch_bytes = 0u64;
            while let Some(d) = level.front().copied() {
                // Sizes are at most MAX_DIRECTORY_BYTES each: this sum cannot overflow.
                if !batch.is_empty() && (batch.len() >= READ_AT_ONCE || batch_bytes + d.size() > READ_BYTES) {
                    break;
                }
                batch_bytes += d.size();
                batch.push(d);
                level.pop_front();
            }
            for (d, r) in cas.read_many(&batch).await.map_err(status)? {
                if let Ok(b) = r {
                    pending.push((d, b));
                }
            }
        }
        yield reapi::GetTreeResponse { directories: page, next_page_token: String::new() };
    })
}
