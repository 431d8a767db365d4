//! Large verified blobs held in sealed memory files until a background thread has copied
//! them into the disk cache.
//!
//! Writing a fresh 1 GiB file on ext4 costs more than receiving and hashing it, so a large
//! blob is fetched into a memory file (memfd) while it is hashed; readers and passthrough
//! opens get that file the moment its hash matched, and the disk copy follows. Until the
//! copy is in the disk cache the blob stays here, so a verified blob is always in one of
//! the two. Memory is bounded across every mount of the process (an executor runs many at
//! once): a fetch that finds no room goes straight to the disk cache.
//!
//! A blob whose copy failed (a full disk) is *stranded*: still served, still counted in the
//! budget, but the first to go when a fetch needs room, and never more than half the
//! budget; it is then fetched again when next wanted. Stranded blobs get another try at
//! the disk after a copy succeeds.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use super::tiers::OnDisk;
use crate::digest::Digest;

/// Bytes held in memory files by every `LargeBlobs` of the process, or reserved for fetches
/// in progress.
static IN_MEMORY: AtomicU64 = AtomicU64::new(0);

#[derive(Default)]
struct State {
    files: HashMap<Digest, Arc<File>>,
    /// Blobs waiting for the disk, oldest first.
    queue: VecDeque<Digest>,
    /// Blobs whose copy to the disk failed, oldest first, and their bytes.
    stranded: VecDeque<Digest>,
    stranded_bytes: u64,
    /// The writer is copying one blob.
    busy: bool,
    closed: bool,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled when a blob is queued or the store closes.
    work: Condvar,
    /// Signalled when the writer finished a blob.
    done: Condvar,
    disk: Arc<OnDisk>,
    /// Most bytes of stranded blobs kept.
    stranded_max: u64,
}

/// Verified large blobs in memory, copied to the disk cache in the background.
pub struct LargeBlobs {
    shared: Arc<Shared>,
    budget: u64,
}

/// Room for one blob being fetched into memory, given back when dropped unless the blob
/// was taken by [`LargeBlobs::insert`].
pub struct Reservation {
    size: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        IN_MEMORY.fetch_sub(self.size, Ordering::Relaxed);
    }
}

/// A new, empty memory file that can be sealed.
pub fn memory_file(name: &std::ffi::CStr) -> std::io::Result<File> {
    // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: memfd_create returned a new descriptor that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Forbids every further change of a memory file's content and size.
fn seal(file: &File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on a descriptor `file` owns; F_ADD_SEALS takes an integer, no memory.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl LargeBlobs {
    /// Holds large blobs in memory, copying each into `disk`'s blob files from its own
    /// thread, while the process holds at most `budget` bytes of them. A budget of 0 keeps
    /// nothing.
    pub(crate) fn new(disk: Arc<OnDisk>, budget: u64) -> Arc<Self> {
        let state = Mutex::new(State::default());
        let shared =
            Arc::new(Shared { state, work: Condvar::new(), done: Condvar::new(), disk, stranded_max: budget / 2 });
        let mut budget = budget;
        if budget > 0 {
            let s = shared.clone();
            let spawned = std::thread::Builder::new().name("casfs-large-writer".into()).spawn(move || writer(&s));
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "no background writer for large blobs; they go to the disk directly");
                budget = 0;
            }
        }
        Arc::new(LargeBlobs { shared, budget })
    }

    /// The memory file of a blob held here.
    pub fn get(&self, digest: &Digest) -> Option<Arc<File>> {
        self.shared.state.lock().unwrap().files.get(digest).cloned()
    }

    /// True when the blob is held here.
    pub fn contains(&self, digest: &Digest) -> bool {
        self.shared.state.lock().unwrap().files.contains_key(digest)
    }

    /// Room for a blob of `size` bytes, if the budget has it (stranded blobs make room).
    pub fn reserve(&self, size: u64) -> Option<Reservation> {
        let fits = |held: u64| (held + size <= self.budget).then_some(held + size);
        let mut s = self.shared.state.lock().unwrap();
        if s.closed {
            return None;
        }
        while IN_MEMORY.fetch_update(Ordering::Relaxed, Ordering::Relaxed, fits).is_err() {
            if !s.drop_oldest_stranded() {
                return None;
            }
        }
        Some(Reservation { size })
    }

    /// Takes a memory file holding exactly the bytes of `digest`, already verified: it is
    /// sealed, served from here at once and queued for the disk cache.
    pub fn insert(&self, mut room: Reservation, digest: Digest, file: File) -> Arc<File> {
        if let Err(e) = seal(&file) {
            tracing::debug!(digest = %digest, error = %e, "could not seal a memory file");
        }
        let file = Arc::new(file);
        // The reservation's bytes now count for the held file.
        room.size = 0;
        drop(room);
        let mut s = self.shared.state.lock().unwrap();
        if let Some(old) = s.files.insert(digest, file.clone()) {
            // Fetched twice (a race with the disk path): keep one copy's bytes.
            drop(old);
            IN_MEMORY.fetch_sub(digest.size(), Ordering::Relaxed);
        } else {
            s.queue.push_back(digest);
        }
        drop(s);
        self.shared.work.notify_one();
        file
    }

    /// Waits until every blob taken so far is in the disk cache (or failed to get there).
    pub fn flush(&self) {
        let mut s = self.shared.state.lock().unwrap();
        while !s.queue.is_empty() || s.busy {
            s = self.shared.done.wait(s).unwrap();
        }
    }
}

impl State {
    /// Forgets the oldest stranded blob (its readers keep their open file); false if none.
    fn drop_oldest_stranded(&mut self) -> bool {
        let Some(d) = self.stranded.pop_front() else { return false };
        self.stranded_bytes -= d.size();
        if self.files.remove(&d).is_some() {
            IN_MEMORY.fetch_sub(d.size(), Ordering::Relaxed);
        }
        tracing::debug!(digest = %d, "dropped a blob the disk cache refused; it is fetched again when wanted");
        true
    }
}

impl Drop for LargeBlobs {
    fn drop(&mut self) {
        self.flush();
        let mut s = self.shared.state.lock().unwrap();
        s.closed = true;
        // Blobs that could not reach the disk leave memory with the mount.
        for (d, _) in s.files.drain() {
            IN_MEMORY.fetch_sub(d.size(), Ordering::Relaxed);
        }
        drop(s);
        self.shared.work.notify_all();
    }
}

/// The writer thread: copies queued blobs into the disk cache, then forgets their memory
/// files (only after they are on disk). A blob that cannot be written is stranded (see
/// the module docs).
fn writer(shared: &Shared) {
    super::hot::background_priority();
    loop {
        let (digest, file) = {
            let mut s = shared.state.lock().unwrap();
            loop {
                if let Some(d) = s.queue.pop_front() {
                    if let Some(f) = s.files.get(&d).cloned() {
                        s.busy = true;
                        break (d, f);
                    }
                } else if s.closed {
                    return;
                } else {
                    s = shared.work.wait(s).unwrap();
                }
            }
        };
        let res = shared.disk.write_file_from(&digest, &file);
        drop(file);
        let mut s = shared.state.lock().unwrap();
        match res {
            Ok(()) => {
                if s.files.remove(&digest).is_some() {
                    IN_MEMORY.fetch_sub(digest.size(), Ordering::Relaxed);
                }
                // The disk takes writes: the stranded get another try.
                let again = std::mem::take(&mut s.stranded);
                s.stranded_bytes = 0;
                s.queue.extend(again);
            }
            Err(e) => {
                if !e.is_disk_full() {
                    // (A full disk was warned about once by the disk cache.)
                    tracing::warn!(digest = %digest, error = %e, "could not copy a blob to the disk cache");
                }
                s.stranded.push_back(digest);
                s.stranded_bytes += digest.size();
                while s.stranded_bytes > shared.stranded_max && s.drop_oldest_stranded() {}
            }
        }
        s.busy = false;
        drop(s);
        shared.done.notify_all();
    }
}
