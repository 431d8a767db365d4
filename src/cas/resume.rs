//! Whole-blob downloads that survive slow links, broken streams and server restarts.
//!
//! [`resuming`] reads a blob as one stream of chunks, but underneath it opens as many reads
//! as it takes: when a read breaks off (a transport error, a server killed mid-stream) or
//! brings no byte for [`Resume::idle`], the next read starts at the first byte not yet
//! delivered (ByteStream `read_offset`). The deadline therefore measures progress, not total
//! time: a blob of any size reads over a slow link as long as bytes keep coming. The consumer
//! sees one uninterrupted stream, so whatever it hashes or writes (a memory file, a blob file)
//! is appended to, never restarted, and the whole blob is still checked against its digest.
//!
//! Attempts in a row that bring no byte are bounded ([`Resume::retries`]), with exponential
//! backoff between them, and so are resumes in all: a dead or frozen server ends the stream
//! with an error within a bounded time, never a hang.

use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::StreamExt;

use crate::digest::Digest;
use crate::error::{Error, Result};

/// First pause before a resumed read; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Longest pause between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Resumed reads of one blob at most, progress or not (a server that sends a few bytes and
/// breaks off every time must not keep a reader waiting for ever).
const MAX_RESUMES: u32 = 64;

/// How a download resumes.
#[derive(Clone, Copy, Debug)]
pub struct Resume {
    /// Longest wait for the next byte (for the answer to a read, and for each chunk after).
    pub idle: Duration,
    /// Attempts in a row that may end without a byte before the download fails.
    pub retries: u32,
}

/// Whether a read that failed with `e` may be resumed: transport failures, stalls and the
/// codes servers and proxies give while going away. Answers about the blob itself (absent,
/// refused, unauthenticated) are final.
pub fn resumable(e: &Error) -> bool {
    use tonic::Code;
    match e {
        Error::DeadlineExceeded(_) | Error::Unavailable(_) | Error::ResourceExhausted(_) => true,
        Error::Remote { code, .. } => matches!(
            code,
            Code::Unavailable
                | Code::ResourceExhausted
                | Code::DeadlineExceeded
                | Code::Unknown
                | Code::Internal
                | Code::Aborted
                | Code::Cancelled
        ),
        _ => false,
    }
}

/// Opens a read of a blob from a byte offset to its end.
pub type Open<'a> = Box<dyn FnMut(u64) -> BoxFuture<'a, Result<BoxStream<'a, Result<Bytes>>>> + Send + 'a>;

/// The whole of `digest`, read through `open` and resumed where it broke off (see the module
/// doc). `on_resume` hears the offset of every resumed read. The stream yields exactly
/// `digest.size()` bytes or ends with an error; it does not verify them (its consumer hashes
/// them as they pass).
pub fn resuming<'a>(
    digest: Digest,
    mut open: Open<'a>,
    policy: Resume,
    on_resume: impl Fn(u64) + Send + 'a,
) -> BoxStream<'a, Result<Bytes>> {
    async_stream::stream! {
        let size = digest.size();
        let idle = policy.idle;
        let mut pos = 0u64;
        let mut in_a_row = 0u32;
        let mut resumes = 0u32;
        let mut delay = FIRST_BACKOFF;
        loop {
            let from = pos;
            let err = match tokio::time::timeout(idle, open(pos)).await {
                Err(_) => Error::DeadlineExceeded(format!("reading {digest} at byte {pos}: no answer within {idle:?}")),
                Ok(Err(e)) => e,
                Ok(Ok(mut s)) => loop {
                    match tokio::time::timeout(idle, s.next()).await {
                        Err(_) => {
                            break Error::DeadlineExceeded(format!(
                                "reading {digest}: no bytes for {idle:?} at byte {pos} of {size}"
                            ))
                        }
                        Ok(None) if pos == size => return,
                        Ok(None) => {
                            break Error::Remote {
                                context: format!("ByteStream.Read {digest}"),
                                code: tonic::Code::Aborted,
                                message: format!("the stream ended at byte {pos} of {size}"),
                            }
                        }
                        Ok(Some(Ok(chunk))) => {
                            if pos + chunk.len() as u64 > size {
                                yield Err(Error::InvalidArgument(format!("more than {size} bytes sent for {digest}")));
                                return;
                            }
                            pos += chunk.len() as u64;
                            yield Ok(chunk);
                        }
                        Ok(Some(Err(e))) => break e,
                    }
                },
            };
            if pos > from {
                in_a_row = 0;
                delay = FIRST_BACKOFF;
            }
            if !resumable(&err) || in_a_row >= policy.retries || resumes >= MAX_RESUMES {
                if pos > 0 || resumes > 0 {
                    tracing::warn!(digest = %digest, at = pos, resumes, error = %err, "giving up on a download");
                }
                yield Err(err);
                return;
            }
            in_a_row += 1;
            resumes += 1;
            let jitter = Duration::from_millis(rand::random::<u64>() % (delay.as_millis() as u64 / 2 + 1));
            tracing::info!(digest = %digest, at = pos, attempt = in_a_row, error = %err, "resuming a download after {:?}", delay + jitter);
            tokio::time::sleep(delay + jitter).await;
            delay = (delay * 2).min(MAX_BACKOFF);
            on_resume(pos);
        }
    }
    .boxed()
}
