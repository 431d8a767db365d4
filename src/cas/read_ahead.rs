//! Streaming a blob file to a reader with a few chunks read ahead, never holding a thread
//! while the reader is not reading.
//!
//! One blocking task reads chunks into a small queue while there is room and ends when the
//! queue is full or the file is done; taking a chunk out starts it again. A fast reader keeps
//! one task busy from start to end (as a dedicated thread would); a reader that stops
//! reading holds the open file and at most [`AHEAD`] chunks.

use std::collections::VecDeque;
use std::io::{Read, Seek, SeekFrom};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::Notify;

use super::{ByteStream, CHUNK};
use crate::digest::Digest;
use crate::error::{Error, IoContext, Result};

/// Chunks read ahead of the reader at most.
const AHEAD: usize = 4;

struct State {
    /// The file while no task reads it.
    file: Option<std::fs::File>,
    /// Where the next chunk starts.
    pos: u64,
    chunks: VecDeque<Result<Bytes>>,
    running: bool,
    /// Set after an error: nothing more is read.
    failed: bool,
}

struct Shared {
    digest: Digest,
    end: u64,
    state: Mutex<State>,
    ready: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn more_to_read(&self, s: &State) -> bool {
        !s.failed && s.pos < self.end
    }

    /// Starts the reading task if it is not running, there is room and something to read.
    fn kick(self: &Arc<Self>, s: &mut State) {
        if s.running || s.chunks.len() >= AHEAD || !self.more_to_read(s) {
            return;
        }
        let Some(file) = s.file.take() else { return };
        s.running = true;
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.read_while_room(file));
    }

    /// The blocking task: reads chunks until the queue is full or the file is done.
    fn read_while_room(&self, mut file: std::fs::File) {
        loop {
            let pos = {
                let mut s = self.lock();
                if s.chunks.len() >= AHEAD || !self.more_to_read(&s) {
                    s.file = Some(file);
                    s.running = false;
                    drop(s);
                    self.ready.notify_one();
                    return;
                }
                s.pos
            };
            let want = ((self.end - pos) as usize).min(CHUNK);
            let r = read_chunk(&mut file, &self.digest, pos, want);
            let mut s = self.lock();
            s.failed |= r.is_err();
            s.pos = pos + want as u64;
            s.chunks.push_back(r);
            drop(s);
            self.ready.notify_one();
        }
    }
}

/// Reads `want` bytes of a blob file from `pos` (blocking); a short file is an error.
fn read_chunk(file: &mut std::fs::File, digest: &Digest, pos: u64, want: usize) -> Result<Bytes> {
    file.seek(SeekFrom::Start(pos)).ctx(|| format!("seeking in blob {digest}"))?;
    // read_to_end fills spare capacity: no zeroing of each chunk first.
    let mut buf = Vec::with_capacity(want);
    let n = Read::take(&mut *file, want as u64).read_to_end(&mut buf).ctx(|| format!("reading blob {digest}"))?;
    if n != want {
        return Err(Error::Internal(format!("blob {digest} is shorter than its digest says")));
    }
    Ok(buf.into())
}

/// Streams bytes `offset..end` of `file` (the blob `digest`) in chunks of at most [`CHUNK`].
pub fn stream(file: std::fs::File, digest: Digest, offset: u64, end: u64) -> ByteStream {
    let state = State { file: Some(file), pos: offset, chunks: VecDeque::new(), running: false, failed: false };
    let shared = Arc::new(Shared { digest, end, state: Mutex::new(state), ready: Notify::new() });
    shared.kick(&mut shared.lock());
    futures::stream::unfold(shared, |shared| async move {
        loop {
            {
                let mut s = shared.lock();
                if let Some(chunk) = s.chunks.pop_front() {
                    shared.kick(&mut s);
                    drop(s);
                    return Some((chunk, shared));
                }
                if !s.running && !shared.more_to_read(&s) {
                    return None;
                }
                shared.kick(&mut s);
            }
            shared.ready.notified().await;
        }
    })
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_of(data: &[u8]) -> std::fs::File {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(data).unwrap();
        f
    }

    #[tokio::test]
    async fn streams_the_range_in_chunks() {
        let data: Vec<u8> = (0..CHUNK * 5 + CHUNK / 2).map(|i| (i % 251) as u8).collect();
        let d = Digest::of_bytes(&data);
        let (from, to) = (3u64, data.len() as u64 - 7);
        let mut s = stream(file_of(&data), d, from, to);
        let mut got = Vec::new();
        while let Some(c) = s.next().await {
            let c = c.unwrap();
            assert!(c.len() <= CHUNK);
            got.extend_from_slice(&c);
        }
        assert_eq!(got, &data[from as usize..to as usize]);
    }

    #[tokio::test]
    async fn a_reader_that_stops_holds_no_thread_and_a_bounded_queue() {
        let data = vec![7u8; CHUNK * 20];
        let d = Digest::of_bytes(&data);
        let state =
            State { file: Some(file_of(&data)), pos: 0, chunks: VecDeque::new(), running: false, failed: false };
        let shared =
            Arc::new(Shared { digest: d, end: data.len() as u64, state: Mutex::new(state), ready: Notify::new() });
        shared.kick(&mut shared.lock());
        // The task fills the queue and ends: it is told to no one, so wait for it to stop.
        for _ in 0..500 {
            if !shared.lock().running {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let s = shared.lock();
        assert!(!s.running, "the reading task still runs with nobody reading");
        assert_eq!(s.chunks.len(), AHEAD);
        assert!(s.file.is_some());
    }

    #[tokio::test]
    async fn a_file_shorter_than_its_digest_ends_with_an_error() {
        let data = vec![1u8; CHUNK + 10];
        let d = Digest::new_with(
            crate::digest::DigestFunction::Sha256,
            Digest::of_bytes(&data).hash_bytes(),
            (CHUNK * 3) as u64,
        )
        .unwrap();
        let items: Vec<Result<Bytes>> = stream(file_of(&data), d, 0, d.size()).collect().await;
        assert_eq!(items.len(), 2, "one chunk, then the error, then the end");
        assert!(items[0].is_ok());
        assert!(matches!(items[1], Err(Error::Internal(_))));
    }
}
