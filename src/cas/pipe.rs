//! Streaming a blob into a file while it is hashed on another thread, for large blobs.
//!
//! Hashing and writing each run on a blocking thread, fed the same chunks (no copies), so
//! receiving, hashing and writing overlap. A thread is taken only while there are bytes
//! to hash or write: each lane runs one blocking task over the chunks queued so far and
//! returns when the queue is empty; the next chunk starts a new task. An upload whose
//! client stops sending therefore holds no thread, only its file and queued chunks.

use std::collections::VecDeque;
use std::io::Write;

use bytes::Bytes;
use futures::StreamExt;
use tokio::task::JoinHandle;

use super::ByteStream;
use crate::digest::{Digest, Hasher};
use crate::error::{Error, IoContext, Result};

/// Bytes received but not yet both hashed and written; past it the network waits.
const IN_FLIGHT: usize = 16 << 20;

/// One sequential worker (hash or write) over queued chunks.
struct Lane<S: Send + 'static> {
    /// The worker's state while no task runs (`None` while one does).
    state: Option<S>,
    queue: VecDeque<Bytes>,
    /// Bytes queued or being worked on.
    held: usize,
    running: Option<JoinHandle<(S, usize, std::io::Result<()>)>>,
    work: fn(&mut S, &Bytes) -> std::io::Result<()>,
}

impl<S: Send + 'static> Lane<S> {
    fn new(state: S, work: fn(&mut S, &Bytes) -> std::io::Result<()>) -> Self {
        Lane { state: Some(state), queue: VecDeque::new(), held: 0, running: None, work }
    }

    fn push(&mut self, chunk: Bytes) {
        self.held += chunk.len();
        self.queue.push_back(chunk);
        self.start();
    }

    /// Starts a blocking task over everything queued, unless one runs or nothing is queued.
    fn start(&mut self) {
        if self.running.is_some() || self.queue.is_empty() {
            return;
        }
        let Some(mut state) = self.state.take() else { return };
        let batch = std::mem::take(&mut self.queue);
        let work = self.work;
        self.running = Some(tokio::task::spawn_blocking(move || {
            let mut done = 0;
            for c in &batch {
                if let Err(e) = work(&mut state, c) {
                    return (state, done, Err(e));
                }
                done += c.len();
            }
            (state, done, Ok(()))
        }));
    }

    /// Waits for the running task (call only while one runs), then starts the next batch.
    async fn finish_batch(&mut self) -> Result<std::io::Result<()>> {
        let Some(task) = self.running.as_mut() else { return Ok(Ok(())) };
        let joined = task.await;
        self.running = None;
        let (state, done, res) = joined.map_err(|e| Error::Internal(format!("blob pipeline task: {e}")))?;
        self.state = Some(state);
        self.held -= done;
        if res.is_ok() {
            self.start();
        }
        Ok(res)
    }

    fn idle(&self) -> bool {
        self.running.is_none() && self.queue.is_empty()
    }
}

fn hash_chunk(h: &mut Hasher, c: &Bytes) -> std::io::Result<()> {
    h.update(c);
    Ok(())
}

fn write_chunk(f: &mut std::fs::File, c: &Bytes) -> std::io::Result<()> {
    f.write_all(c)
}

/// Writes the chunks of `data` into `file` while hashing them (see the module doc).
/// Returns the file only when the bytes matched `digest`; the caller makes them visible.
/// An error of the source (a client that broke off or went idle) ends it at once.
pub async fn write_verified(digest: &Digest, mut data: ByteStream, file: std::fs::File) -> Result<std::fs::File> {
    let mut hash = Lane::new(Hasher::new(), hash_chunk);
    let mut write = Lane::new(file, write_chunk);
    let mut total = 0u64;
    let mut ended = false;
    while !(ended && hash.idle() && write.idle()) {
        let room = !ended && hash.held.max(write.held) < IN_FLIGHT;
        tokio::select! {
            next = data.next(), if room => match next {
                Some(Ok(chunk)) => {
                    total += chunk.len() as u64;
                    if total > digest.size() {
                        return Err(Error::InvalidArgument(format!(
                            "more than {} bytes sent for {digest}", digest.size()
                        )));
                    }
                    write.push(chunk.clone());
                    hash.push(chunk);
                }
                Some(Err(e)) => return Err(e),
                None => ended = true,
            },
            r = hash.finish_batch(), if hash.running.is_some() => {
                r?.map_err(|e| Error::io(format!("hashing blob {digest}"), e))?;
            }
            r = write.finish_batch(), if write.running.is_some() => {
                r?.ctx(|| format!("writing blob {digest}"))?;
            }
        }
    }
    let (Some(hasher), Some(file)) = (hash.state, write.state) else {
        return Err(Error::Internal(format!("blob pipeline of {digest} ended with a task running")));
    };
    let actual = hasher.finish();
    if actual != *digest {
        return Err(Error::DigestMismatch { expected: *digest, actual });
    }
    Ok(file)
}
