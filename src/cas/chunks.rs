//! FastCDC 2020 content-defined chunking of blobs, as REAPI's SplitBlob and SpliceBlob use it.
//!
//! The parameters follow the spec: an average chunk size between 1 KiB and 1 MiB (512 KiB
//! recommended, and advertised by `casfs serve`), minimum a quarter of it, maximum four times
//! it, normalization level 2, seed 0. Blobs smaller than the maximum chunk size are not chunked.
//!
//! Chunk lists prove nothing by themselves: whoever assembles a blob from chunks hashes the
//! result against the blob's own digest before anyone sees it (see [`concat`]).

use std::io::Read;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};

use super::{ByteStream, SharedCas};
use crate::digest::{Digest, DigestFunction, Hasher};
use crate::error::{Error, Result};
use crate::proto::reapi;

/// Most chunks one SpliceBlob may name (a list this long already fills a large message).
pub const MAX_SPLICE_CHUNKS: usize = 1 << 16;

/// FastCDC 2020 parameters (REAPI `FastCdc2020Params`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkParams {
    /// Average (expected) chunk size in bytes.
    pub avg: u32,
    /// Seed XOR'd into the gear table.
    pub seed: u32,
}

impl ChunkParams {
    /// What `casfs serve` advertises: the spec's recommended 512 KiB average, seed 0.
    pub const DEFAULT: ChunkParams = ChunkParams { avg: 512 << 10, seed: 0 };

    /// Advertised parameters, or `None` when they are out of the spec's range (an average
    /// between 1 KiB and 1 MiB; even, as the chunker needs), which clients then ignore.
    pub fn from_proto(p: &reapi::FastCdc2020Params) -> Option<Self> {
        let avg = p.avg_chunk_size_bytes;
        ((1 << 10)..=(1 << 20)).contains(&avg).then_some(())?;
        avg.is_multiple_of(8).then_some(ChunkParams { avg: avg as u32, seed: p.seed })
    }

    /// The parameters as advertised in Capabilities.
    pub fn to_proto(self) -> reapi::FastCdc2020Params {
        reapi::FastCdc2020Params { avg_chunk_size_bytes: self.avg as u64, seed: self.seed }
    }

    /// Smallest chunk (but the last): a quarter of the average.
    pub fn min(self) -> u32 {
        self.avg / 4
    }

    /// Largest chunk: four times the average.
    pub fn max(self) -> u32 {
        self.avg * 4
    }

    /// Smallest blob worth chunking: the spec uploads blobs below the maximum chunk whole.
    pub fn threshold(self) -> u64 {
        self.max() as u64
    }
}

/// Chunks what `source` yields, on the calling (blocking) thread: `each` gets every chunk's
/// offset, digest (under `f`) and bytes, in order. Returns the digest of the whole.
pub fn chunk_reader<R: Read>(
    source: R,
    params: ChunkParams,
    f: DigestFunction,
    mut each: impl FnMut(u64, Digest, Vec<u8>) -> Result<()>,
) -> Result<Digest> {
    use fastcdc::v2020::{Normalization, StreamCDC};
    let cdc = StreamCDC::with_level_and_seed(
        source,
        params.min(),
        params.avg,
        params.max(),
        Normalization::Level2,
        params.seed as u64,
    );
    let mut whole = Hasher::new_with(f);
    for chunk in cdc {
        let chunk = chunk.map_err(chunker_error)?;
        whole.update(&chunk.data);
        let d = Digest::of_bytes_with(f, &chunk.data);
        each(chunk.offset, d, chunk.data)?;
    }
    Ok(whole.finish())
}

/// The crate error behind a chunker failure (a read error of [`StreamReader`] carries one).
fn chunker_error(e: fastcdc::v2020::Error) -> Error {
    match e {
        fastcdc::v2020::Error::IoError(io) => match io.into_inner().map(|b| b.downcast::<Error>()) {
            Some(Ok(e)) => *e,
            Some(Err(other)) => Error::Internal(format!("chunking: {other}")),
            None => Error::Internal("chunking: read error".into()),
        },
        e => Error::Internal(format!("chunking: {e}")),
    }
}

/// A blocking reader over a [`ByteStream`] forwarded through a channel (for the chunker,
/// which runs on a blocking thread).
struct StreamReader {
    rx: tokio::sync::mpsc::Receiver<Result<Bytes>>,
    cur: Bytes,
}

impl Read for StreamReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.cur = b,
                Some(Err(e)) => return Err(std::io::Error::other(e)),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur.split_to(n));
        Ok(n)
    }
}

/// Splits a blob stored in `cas` into chunks, stores every chunk in `cas` (same function)
/// and returns their digests in order. The blob's bytes are hashed on the way: a store that
/// returns other bytes than its digest says fails the split. Memory stays within a few
/// chunks whatever the blob's size.
pub async fn split_stored(cas: &SharedCas, digest: &Digest, params: ChunkParams) -> Result<Vec<Digest>> {
    let mut source = cas.read_stream(digest, 0, 0).await?;
    let (in_tx, in_rx) = tokio::sync::mpsc::channel::<Result<Bytes>>(4);
    let feeder = tokio::spawn(async move {
        while let Some(b) = source.next().await {
            if in_tx.send(b).await.is_err() {
                return;
            }
        }
    });
    let (out_tx, mut out_rx) = tokio::sync::mpsc::channel::<(Digest, Bytes)>(4);
    let f = digest.function();
    let chunker = tokio::task::spawn_blocking(move || {
        let reader = StreamReader { rx: in_rx, cur: Bytes::new() };
        chunk_reader(reader, params, f, |_, d, data| {
            out_tx.blocking_send((d, data.into())).map_err(|_| Error::Internal("chunk writer gone".into()))
        })
    });
    let mut chunks = Vec::new();
    let mut failed = None;
    while let Some((d, data)) = out_rx.recv().await {
        if failed.is_none() {
            match cas.write(&d, data).await {
                Ok(()) => chunks.push(d),
                Err(e) => failed = Some(e),
            }
        }
    }
    feeder.abort();
    let whole = chunker.await.map_err(|e| Error::Internal(format!("chunker: {e}")))?;
    if let Some(e) = failed {
        return Err(e);
    }
    let whole = whole?;
    if whole != *digest {
        return Err(Error::Internal(format!("stored blob {digest} reads back as {whole}")));
    }
    Ok(chunks)
}

/// The bytes of `chunks` in order, one chunk at a time, as `cas` streams them. Not verified
/// here: the caller hashes the whole (a store's `write_stream` does).
pub fn concat(cas: SharedCas, chunks: Vec<Digest>) -> ByteStream {
    futures::stream::iter(chunks)
        .then(move |c| {
            let cas = cas.clone();
            async move { cas.read_stream(&c, 0, 0).await }
        })
        .try_flatten()
        .boxed()
}

/// Bytes of chunks read from a file or fetched in one go (a few batches).
const CHUNK_GROUP_BYTES: u64 = 16 << 20;

/// Splits `list` into runs of about 16 MiB (a chunk larger than that is a run of its own);
/// no run is empty.
pub fn groups(list: &[Digest]) -> Vec<Vec<Digest>> {
    let mut out: Vec<Vec<Digest>> = Vec::new();
    let mut bytes = 0;
    for d in list {
        match out.last_mut() {
            Some(g) if bytes + d.size() <= CHUNK_GROUP_BYTES => g.push(*d),
            _ => {
                out.push(vec![*d]);
                bytes = 0;
            }
        }
        bytes += d.size();
    }
    out
}

/// Refuses a chunk list that cannot make `blob`, before anything is read: too many chunks,
/// chunks of another digest function, or sizes that do not add up to the blob's.
pub fn check_list(blob: &Digest, chunks: &[Digest]) -> Result<()> {
    if chunks.len() > MAX_SPLICE_CHUNKS {
        return Err(Error::InvalidArgument(format!(
            "{} chunks for {blob}, more than the {MAX_SPLICE_CHUNKS} this server splices",
            chunks.len()
        )));
    }
    if let Some(c) = chunks.iter().find(|c| c.function() != blob.function()) {
        return Err(Error::InvalidArgument(format!("chunk {c} is not hashed with {}", blob.function())));
    }
    let total = chunks.iter().try_fold(0u64, |acc, c| acc.checked_add(c.size()));
    if total != Some(blob.size()) {
        let said = total.map_or("more than 2^64".to_string(), |t| t.to_string());
        return Err(Error::InvalidArgument(format!(
            "chunk sizes add up to {said} bytes, but {blob} has {} bytes",
            blob.size()
        )));
    }
    Ok(())
}

/// Stores `blob` in `cas` as the concatenation of `chunks` (all stored in `cas`), streamed and
/// verified against `blob`: a mismatch stores nothing. A missing chunk is `MissingBlob`
/// naming it, found before anything is read.
pub async fn splice_into(cas: &SharedCas, blob: &Digest, chunks: &[Digest]) -> Result<()> {
    check_list(blob, chunks)?;
    if let Some(m) = cas.find_missing(chunks).await?.first() {
        return Err(Error::MissingBlob(*m));
    }
    cas.write_stream(blob, concat(cas.clone(), chunks.to_vec())).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_keep_order_stay_near_16_mib_and_are_never_empty() {
        let d = |i: u8, mib: u64| Digest::new([i; 32], mib << 20);
        assert!(groups(&[]).is_empty());
        let list = [d(1, 6), d(2, 6), d(3, 6), d(4, 40), d(5, 1)];
        let g = groups(&list);
        assert_eq!(g.concat(), list.to_vec());
        assert_eq!(g.iter().map(Vec::len).collect::<Vec<_>>(), [2, 1, 1, 1]);
    }

    #[test]
    fn params_follow_the_spec() {
        let p = ChunkParams::DEFAULT;
        assert_eq!((p.min(), p.avg, p.max(), p.threshold()), (128 << 10, 512 << 10, 2 << 20, 2 << 20));
        let bad = reapi::FastCdc2020Params { avg_chunk_size_bytes: 4 << 20, seed: 0 };
        assert_eq!(ChunkParams::from_proto(&bad), None);
        assert_eq!(ChunkParams::from_proto(&p.to_proto()), Some(p));
    }

    #[test]
    fn chunks_concatenate_to_the_blob_and_a_local_change_keeps_most_chunks() -> Result<()> {
        let mut data = crate::cas::pseudo_random(1, 8 << 20);
        let list = |data: &[u8]| -> Result<Vec<Digest>> {
            let mut out = Vec::new();
            let mut joined = Vec::new();
            let whole = chunk_reader(data, ChunkParams::DEFAULT, DigestFunction::Sha256, |_, d, b| {
                joined.extend_from_slice(&b);
                out.push(d);
                Ok(())
            })?;
            assert_eq!(whole, Digest::of_bytes(data));
            assert_eq!(joined, data);
            Ok(out)
        };
        let before = list(&data)?;
        assert!(before.len() > 4 && before.iter().all(|c| c.size() <= 2 << 20));
        data[4 << 20] ^= 0xff;
        let after = list(&data)?;
        let kept = after.iter().filter(|c| before.contains(c)).count();
        assert!(kept + 3 >= after.len(), "{kept} of {} chunks kept", after.len());
        Ok(())
    }

    #[test]
    fn lists_that_cannot_make_the_blob_are_refused() {
        let blob = Digest::of_bytes(b"abcdef");
        let (a, b) = (Digest::of_bytes(b"abc"), Digest::of_bytes(b"def"));
        assert!(check_list(&blob, &[a, b]).is_ok());
        assert!(check_list(&blob, &[a]).is_err());
        assert!(check_list(&blob, &[a, b, a]).is_err());
    }
}
