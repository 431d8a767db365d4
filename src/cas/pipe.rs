//! Streaming a blob into a file while it is hashed on another thread, for large blobs.
//!
//! Hashing and writing each run on a blocking thread, fed the same chunks (no copies), so
//! receiving, hashing and writing overlap. A thread is taken only while there are bytes to
//! hash or write: a lane's blocking task works through its queue and ends when the queue is
//! empty; the next chunk starts a new task. An upload whose client stops sending therefore
//! holds no thread, only its file and the chunks not yet written.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::Notify;

use super::ByteStream;
use crate::digest::{Digest, Hasher};
use crate::error::{Error, Result};

/// Bytes received but not yet both hashed and written; past it the network waits.
const IN_FLIGHT: usize = 8 << 20;

/// What a lane's task and the feeding loop share.
struct Queue<S> {
    /// The worker's state while no task runs (the task owns it meanwhile).
    state: Option<S>,
    chunks: VecDeque<Bytes>,
    /// Bytes queued or being worked on.
    held: usize,
    running: bool,
    failed: Option<std::io::Error>,
}

/// One sequential worker (hash or write) over queued chunks.
struct Lane<S: Send + 'static> {
    queue: Arc<Mutex<Queue<S>>>,
    /// Told each time a chunk is done or a task ends (shared by both lanes).
    progress: Arc<Notify>,
    work: fn(&mut S, &Bytes) -> std::io::Result<()>,
}

impl<S: Send + 'static> Lane<S> {
    fn new(state: S, progress: Arc<Notify>, work: fn(&mut S, &Bytes) -> std::io::Result<()>) -> Self {
        let queue = Queue { state: Some(state), chunks: VecDeque::new(), held: 0, running: false, failed: None };
        Lane { queue: Arc::new(Mutex::new(queue)), progress, work }
    }

    fn lock(&self) -> MutexGuard<'_, Queue<S>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a chunk, starting a task unless one is running.
    fn push(&self, chunk: Bytes) {
        let mut q = self.lock();
        if q.failed.is_some() {
            return;
        }
        q.held += chunk.len();
        q.chunks.push_back(chunk);
        if q.running {
            return;
        }
        let Some(state) = q.state.take() else { return };
        q.running = true;
        drop(q);
        let (queue, progress, work) = (self.queue.clone(), self.progress.clone(), self.work);
        tokio::task::spawn_blocking(move || drain(queue, progress, state, work));
    }

    /// (bytes held, idle, failure taken out).
    fn status(&self) -> (usize, bool, Option<std::io::Error>) {
        let mut q = self.lock();
        (q.held, !q.running && q.chunks.is_empty(), q.failed.take())
    }

    fn into_state(self) -> Option<S> {
        self.lock().state.take()
    }
}

/// A lane's blocking task: works through the queue, then hands the state back and ends.
fn drain<S>(
    queue: Arc<Mutex<Queue<S>>>,
    progress: Arc<Notify>,
    mut state: S,
    work: fn(&mut S, &Bytes) -> std::io::Result<()>,
) {
    let lock = || queue.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let chunk = {
            let mut q = lock();
            match q.chunks.pop_front() {
                Some(c) => c,
                None => {
                    q.state = Some(state);
                    q.running = false;
                    drop(q);
                    progress.notify_one();
                    return;
                }
            }
        };
        let res = work(&mut state, &chunk);
        let mut q = lock();
        q.held -= chunk.len();
        if let Err(e) = res {
            q.failed = Some(e);
            q.chunks.clear();
            q.held = 0;
            q.state = Some(state);
            q.running = false;
            drop(q);
            progress.notify_one();
            return;
        }
        drop(q);
        progress.notify_one();
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
    let progress = Arc::new(Notify::new());
    let hash = Lane::new(Hasher::new_with(digest.function()), progress.clone(), hash_chunk);
    let write = Lane::new(file, progress.clone(), write_chunk);
    let mut total = 0u64;
    let mut ended = false;
    loop {
        let (hash_held, hash_idle, hash_failed) = hash.status();
        let (write_held, write_idle, write_failed) = write.status();
        if let Some(e) = hash_failed {
            return Err(Error::io(format!("hashing blob {digest}"), e));
        }
        if let Some(e) = write_failed {
            return Err(Error::io(format!("writing blob {digest}"), e));
        }
        if ended && hash_idle && write_idle {
            break;
        }
        if ended || hash_held.max(write_held) >= IN_FLIGHT {
            progress.notified().await;
            continue;
        }
        tokio::select! {
            next = data.next() => match next {
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
            // A lane moved on (or failed): look again.
            _ = progress.notified() => {}
        }
    }
    let (Some(hasher), Some(file)) = (hash.into_state(), write.into_state()) else {
        return Err(Error::Internal(format!("blob pipeline of {digest} ended with a task running")));
    };
    let actual = hasher.finish();
    if actual != *digest {
        return Err(Error::DigestMismatch { expected: Box::new(*digest), actual: Box::new(actual) });
    }
    Ok(file)
}
