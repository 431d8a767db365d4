//! Writing blobs into a disk store: from a local file, from verified bytes or an open file, and from a stream hashed on its way in.

use std::io::{Read, Write};
use std::path::Path;

use futures::StreamExt;

use super::{check, DiskStore, PIPELINE_MIN};
use crate::cas::{ByteStream, CHUNK};
use crate::digest::{Digest, Hasher};
use crate::error::{Error, IoContext, Result};

impl DiskStore {
    /// Stores a blob by copying a local file, hashing as it copies (blocking).
    pub fn insert_file(&self, digest: &Digest, src: &Path) -> Result<()> {
        let res = self.insert_file_unnoted(digest, src);
        self.note_write(&res);
        res
    }

    pub(super) fn insert_file_unnoted(&self, digest: &Digest, src: &Path) -> Result<()> {
        if self.contains(digest) {
            return Ok(());
        }
        let mut input = std::fs::File::open(src).ctx(|| format!("opening {}", src.display()))?;
        let (mut out, tmp) = self.temp()?;
        let mut hasher = Hasher::new_with(digest.function());
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = input.read(&mut buf).ctx(|| format!("reading {}", src.display()))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).ctx(|| format!("writing blob {digest}"))?;
        }
        check(digest, hasher)?;
        self.commit(digest, tmp)
    }

    /// Stores bytes the caller has already checked against `digest` (blocking; no second
    /// hashing). Only for bytes that were verified on their way in.
    pub fn insert_verified(&self, digest: &Digest, data: &[u8]) -> Result<()> {
        let res = self.insert_verified_unnoted(digest, data);
        self.note_write(&res);
        res
    }

    fn insert_verified_unnoted(&self, digest: &Digest, data: &[u8]) -> Result<()> {
        if self.contains(digest) {
            return Ok(());
        }
        if data.len() as u64 != digest.size() {
            return Err(Error::Internal(format!("{} bytes offered as {digest}", data.len())));
        }
        let (mut file, tmp) = self.temp()?;
        file.write_all(data).ctx(|| format!("writing blob {digest}"))?;
        drop(file);
        self.commit(digest, tmp)
    }

    /// Stores the content of an open file whose bytes the caller has already checked against
    /// `digest` (blocking; copied in the kernel where it can, no second hashing).
    pub fn insert_verified_file(&self, digest: &Digest, src: &std::fs::File) -> Result<()> {
        let res = self.insert_verified_file_unnoted(digest, src);
        self.note_write(&res);
        res
    }

    fn insert_verified_file_unnoted(&self, digest: &Digest, src: &std::fs::File) -> Result<()> {
        if self.contains(digest) {
            return Ok(());
        }
        use std::os::fd::AsRawFd;
        let (out, tmp) = self.temp()?;
        // sendfile with an explicit offset: a kernel copy that leaves `src`'s position alone
        // (others read it at the same time).
        let mut offset: libc::off_t = 0;
        while (offset as u64) < digest.size() {
            let left = (digest.size() - offset as u64).min(1 << 30) as usize;
            // SAFETY: both descriptors are owned by live `File`s and `offset` is a local the
            // call updates in place.
            let n = unsafe { libc::sendfile(out.as_raw_fd(), src.as_raw_fd(), &mut offset, left) };
            match n {
                0 => return Err(Error::Internal(format!("{offset} bytes offered as {digest}"))),
                n if n < 0 => {
                    let e = std::io::Error::last_os_error();
                    if e.kind() != std::io::ErrorKind::Interrupted {
                        return Err(Error::io(format!("copying blob {digest} to the disk"), e));
                    }
                }
                _ => {}
            }
        }
        drop(out);
        self.commit(digest, tmp)
    }

    pub(super) async fn write_stream_unnoted(&self, digest: &Digest, mut data: ByteStream) -> Result<()> {
        if self.contains(digest) {
            return Ok(());
        }
        self.check_room(digest)?;
        if digest.size() >= PIPELINE_MIN {
            // Receiving, hashing and writing overlap; visible only once the whole hash matched.
            let (file, tmp) = self.temp()?;
            drop(crate::cas::pipe::write_verified(digest, data, file).await?);
            return self.commit(digest, tmp);
        }
        let (file, tmp) = self.temp()?;
        let mut file = tokio::fs::File::from_std(file);
        let mut hasher = Hasher::new_with(digest.function());
        while let Some(chunk) = data.next().await {
            let chunk = chunk?;
            hasher.update(&chunk);
            if hasher.len() > digest.size() {
                return Err(Error::InvalidArgument(format!("more than {} bytes sent for {digest}", digest.size())));
            }
            tokio::io::AsyncWriteExt::write_all(&mut file, &chunk).await.ctx(|| format!("writing blob {digest}"))?;
        }
        tokio::io::AsyncWriteExt::flush(&mut file).await.ctx(|| format!("writing blob {digest}"))?;
        drop(file);
        check(digest, hasher)?;
        self.commit(digest, tmp)
    }
}
