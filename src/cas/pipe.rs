//! Streaming a blob into a file while it is hashed on another thread, for large blobs.

use std::io::Write;

use bytes::Bytes;
use futures::StreamExt;

use super::ByteStream;
use crate::digest::{Digest, Hasher};
use crate::error::{Error, IoContext, Result};

/// Chunks buffered between the network and each of the two threads.
const DEPTH: usize = 8;

/// Writes the chunks of `data` into `file` on one blocking thread while hashing them on
/// another (both fed the same chunks, no copies), so receiving, hashing and writing overlap.
/// Returns the file only when the bytes matched `digest`; the caller makes them visible.
pub async fn write_verified(digest: &Digest, mut data: ByteStream, file: std::fs::File) -> Result<std::fs::File> {
    let (hash_tx, mut hash_rx) = tokio::sync::mpsc::channel::<Bytes>(DEPTH);
    let (write_tx, mut write_rx) = tokio::sync::mpsc::channel::<Bytes>(DEPTH);
    let hashing = tokio::task::spawn_blocking(move || {
        let mut hasher = Hasher::new();
        while let Some(c) = hash_rx.blocking_recv() {
            hasher.update(&c);
        }
        hasher
    });
    let writing = tokio::task::spawn_blocking(move || -> std::io::Result<std::fs::File> {
        let mut file = file;
        while let Some(c) = write_rx.blocking_recv() {
            file.write_all(&c)?;
        }
        Ok(file)
    });
    let fed: Result<()> = async {
        let mut total = 0u64;
        while let Some(chunk) = data.next().await {
            let chunk = chunk?;
            total += chunk.len() as u64;
            if total > digest.size() {
                return Err(Error::InvalidArgument(format!("more than {} bytes sent for {digest}", digest.size())));
            }
            // A closed channel means the writer failed: its error is reported below.
            if write_tx.send(chunk.clone()).await.is_err() || hash_tx.send(chunk).await.is_err() {
                break;
            }
        }
        Ok(())
    }
    .await;
    drop((hash_tx, write_tx));
    let joined = |e: tokio::task::JoinError| Error::Internal(format!("writing blob {digest}: {e}"));
    let hasher = hashing.await.map_err(joined)?;
    let written = writing.await.map_err(joined)?;
    fed?;
    let file = written.ctx(|| format!("writing blob {digest}"))?;
    let actual = hasher.finish();
    if actual != *digest {
        return Err(Error::DigestMismatch { expected: *digest, actual });
    }
    Ok(file)
}
