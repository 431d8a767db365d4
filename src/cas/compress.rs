//! zstd for REAPI `compressed-blobs`: streamed coding, and decompression that never outgrows the digest.
//!
//! Decompression trusts nothing in the frame: the content size a header claims is never used to
//! size a buffer, output comes out [`OUT_STEP`] bytes at a time, and the stream fails as soon as
//! it has produced more bytes than the (uncompressed) digest says, so a tiny input that expands
//! to gigabytes costs one step of memory. The window a frame may ask for is capped too (it is
//! the decoder's one large allocation).

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
use zstd::zstd_safe::DParameter;

use crate::error::{Error, Result};

/// The compression level used for blobs (fast: the aim is fewer bytes on the wire without
/// slowing a fast link down).
pub const LEVEL: i32 = 1;
/// Chunks of a stream compressed at once.
const PARALLEL_FRAMES: usize = 2;
/// Decompressed bytes produced per step, at most.
pub const OUT_STEP: usize = 1 << 20;
/// Smallest window a frame may always use (zstd's streaming default at low levels is 2^21 or less).
const MIN_WINDOW_LOG: u32 = 23;
/// Largest window a frame may use (zstd's own default limit).
const MAX_WINDOW_LOG: u32 = 27;
/// `Compressor.Value` of zstd in REAPI messages.
pub const ZSTD: i32 = crate::proto::reapi::compressor::Value::Zstd as i32;
/// `Compressor.Value` of uncompressed data.
pub const IDENTITY: i32 = crate::proto::reapi::compressor::Value::Identity as i32;

fn corrupt(what: &str, e: std::io::Error) -> Error {
    Error::InvalidArgument(format!("{what}: not valid zstd data: {e}"))
}

/// An incremental zstd decoder that refuses to produce more than `cap` bytes.
pub struct Decompressor {
    dec: Decoder<'static>,
    cap: u64,
    produced: u64,
    /// Inside a frame: more input is needed before the data is complete.
    in_frame: bool,
    buf: Vec<u8>,
    what: String,
}

impl Decompressor {
    /// A decoder for data that must decompress to at most `cap` bytes; `what` names it in errors.
    pub fn new(cap: u64, what: impl Into<String>) -> Result<Self> {
        let what = what.into();
        let mut dec = Decoder::new().map_err(|e| Error::Internal(format!("zstd decoder: {e}")))?;
        let log = (64 - cap.saturating_sub(1).leading_zeros()).clamp(MIN_WINDOW_LOG, MAX_WINDOW_LOG);
        dec.set_parameter(DParameter::WindowLogMax(log)).map_err(|e| Error::Internal(format!("zstd decoder: {e}")))?;
        // A step never needs more room than the whole blob and one byte to see it overrun.
        let step = (cap.saturating_add(1)).clamp(1 << 10, OUT_STEP as u64) as usize;
        Ok(Decompressor { dec, cap, produced: 0, in_frame: false, buf: vec![0; step], what })
    }

    /// Decodes from `input[*pos..]` until some output comes (returned, at most [`OUT_STEP`]
    /// bytes) or the input is used up (`None`: feed more, or [`Decompressor::finish`]). Call
    /// again with the same input until `None`: output may remain after the input is consumed.
    pub fn step(&mut self, input: &[u8], pos: &mut usize) -> Result<Option<Bytes>> {
        loop {
            let mut inb = InBuffer::around(&input[*pos..]);
            let mut outb = OutBuffer::around(&mut self.buf[..]);
            let hint = self.dec.run(&mut inb, &mut outb).map_err(|e| corrupt(&self.what, e))?;
            let (read, written) = (inb.pos(), outb.pos());
            *pos += read;
            if read > 0 || written > 0 {
                self.in_frame = hint != 0;
            }
            if written > 0 {
                self.produced += written as u64;
                if self.produced > self.cap {
                    return Err(Error::InvalidArgument(format!(
                        "{}: zstd data decompresses to more than the {} bytes its digest says; refused",
                        self.what, self.cap
                    )));
                }
                return Ok(Some(Bytes::copy_from_slice(&self.buf[..written])));
            }
            if *pos == input.len() || read == 0 {
                return Ok(None);
            }
        }
    }

    /// Ends the data: fails when it stopped inside a frame. Returns the bytes produced.
    pub fn finish(self) -> Result<u64> {
        if self.in_frame {
            return Err(Error::InvalidArgument(format!("{}: zstd data ends inside a frame", self.what)));
        }
        Ok(self.produced)
    }
}

/// The whole of `data` decompressed, refused past `cap` bytes (memory: at most `cap` plus
/// one step).
pub fn decompress_all(data: &[u8], cap: u64, what: &str) -> Result<Bytes> {
    let mut d = Decompressor::new(cap, what)?;
    let mut out = Vec::with_capacity((cap as usize).min(OUT_STEP));
    let mut pos = 0;
    while let Some(piece) = d.step(data, &mut pos)? {
        out.extend_from_slice(&piece);
    }
    d.finish()?;
    Ok(out.into())
}

/// `input` (compressed) decompressed as it arrives, failing past `cap` bytes or on bad data.
pub fn decompress_stream<'a>(
    mut input: BoxStream<'a, Result<Bytes>>,
    cap: u64,
    what: String,
) -> BoxStream<'a, Result<Bytes>> {
    async_stream::try_stream! {
        let mut d = Decompressor::new(cap, what)?;
        while let Some(chunk) = input.next().await {
            let chunk = chunk?;
            let mut pos = 0;
            while let Some(piece) = d.step(&chunk, &mut pos)? {
                yield piece;
            }
        }
        d.finish()?;
    }
    .boxed()
}

thread_local! {
    /// One compression context per thread: making one costs more than compressing a small blob.
    static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// `data` compressed in one go: one frame that states its content size.
pub fn compress_all(data: &[u8]) -> Result<Vec<u8>> {
    let internal = |e: std::io::Error| Error::Internal(format!("zstd: {e}"));
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        let c = match &mut *c {
            Some(c) => c,
            None => c.insert(zstd::bulk::Compressor::new(LEVEL).map_err(internal)?),
        };
        c.compress(data).map_err(internal)
    })
}

/// Compresses `input` as it arrives, each chunk of it a frame of its own: one frame per chunk
/// keeps zstd on its fast path (it never looks back into an earlier buffer) and lets
/// [`PARALLEL_FRAMES`] chunks be compressed at once, on blocking threads. An error of the
/// input ends the stream with that error.
pub fn compress_stream<'a>(input: BoxStream<'a, Result<Bytes>>) -> BoxStream<'a, Result<Bytes>> {
    let frames = input
        .filter(|c| futures::future::ready(!matches!(c, Ok(b) if b.is_empty())))
        .map(|chunk| async move {
            let chunk = chunk?;
            tokio::task::spawn_blocking(move || compress_all(&chunk))
                .await
                .map_err(|e| Error::Internal(format!("zstd: {e}")))?
                .map(Bytes::from)
        })
        .buffered(PARALLEL_FRAMES);
    // An empty input is still one (empty) frame.
    let mut frames = frames.peekable();
    async_stream::try_stream! {
        if std::pin::Pin::new(&mut frames).peek().await.is_none() {
            yield Bytes::from(compress_all(&[])?);
        }
        while let Some(z) = frames.next().await {
            yield z?;
        }
    }
    .boxed()
}

/// The most compressed bytes an honest upload of `size` bytes needs (zstd's bound for one
/// frame, plus room for a stream cut into many frames).
pub fn max_compressed(size: u64) -> u64 {
    size + (size >> 7) + (64 << 10)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(len: usize) -> Vec<u8> {
        let words = ["alpha ", "beta ", "gamma ", "delta\n", "epsilon ", "zeta "];
        let mut out = Vec::with_capacity(len);
        let mut i = 0usize;
        while out.len() < len {
            out.extend_from_slice(words[(i * 7 + i / 3) % words.len()].as_bytes());
            i += 1;
        }
        out.truncate(len);
        out
    }

    async fn collect(s: BoxStream<'_, Result<Bytes>>) -> Result<Vec<u8>> {
        let parts: Vec<Bytes> = s.collect::<Vec<_>>().await.into_iter().collect::<Result<_>>()?;
        Ok(parts.concat())
    }

    #[tokio::test]
    async fn round_trip_streamed_and_whole() {
        for len in [0usize, 1, 1000, OUT_STEP + 17, 3 << 20] {
            let data = text(len);
            let pieces: Vec<Result<Bytes>> = data.chunks(100_000).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
            let z = collect(compress_stream(futures::stream::iter(pieces).boxed())).await.unwrap();
            assert!(len < 1000 || z.len() < len / 4, "{len} bytes compressed to {}", z.len());
            assert_eq!(decompress_all(&z, len as u64, "t").unwrap(), data);
            let zs: Vec<Result<Bytes>> = z.chunks(333).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
            let back = collect(decompress_stream(futures::stream::iter(zs).boxed(), len as u64, "t".into())).await;
            assert_eq!(back.unwrap(), data);
            assert_eq!(decompress_all(&compress_all(&data).unwrap(), len as u64, "t").unwrap(), data);
        }
    }

    #[test]
    fn bombs_and_garbage_are_refused() {
        // 64 MiB of zeros in a few KiB, against a digest of 1 MiB.
        let bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 19).unwrap();
        assert!(bomb.len() < 16 << 10);
        let e = decompress_all(&bomb, 1 << 20, "bomb").unwrap_err().to_string();
        assert!(e.contains("more than the 1048576 bytes"), "{e}");
        assert!(decompress_all(b"not zstd at all", 100, "x").is_err());
        let z = compress_all(&text(5000)).unwrap();
        let e = decompress_all(&z[..z.len() - 3], 5000, "cut").unwrap_err().to_string();
        assert!(e.contains("ends inside a frame") || e.contains("not valid"), "{e}");
        // Two frames back to back are one stream.
        let mut two = compress_all(b"abc").unwrap();
        two.extend(compress_all(b"def").unwrap());
        assert_eq!(&decompress_all(&two, 6, "two").unwrap()[..], b"abcdef");
    }
}
