//! Validated `Directory` messages and canonical Directory trees built from local folders.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use compact_str::CompactString;
use prost::Message;

use crate::digest::{hash_file_with, Digest, DigestFunction};
use crate::error::{Error, IoContext, Result};
use crate::proto::reapi;

/// A file entry of a validated Directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileEntry {
    /// Entry name (one path component; held inline up to 24 bytes, as most names are).
    pub name: CompactString,
    /// Digest of the file's contents.
    pub digest: Digest,
    /// Whether the file is executable.
    pub executable: bool,
}

/// A subdirectory entry of a validated Directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    /// Entry name (one path component).
    pub name: CompactString,
    /// Digest of the child's `Directory` message.
    pub digest: Digest,
}

/// A symlink entry of a validated Directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SymlinkEntry {
    /// Entry name (one path component).
    pub name: String,
    /// Link target, as stored (never resolved by casfs).
    pub target: String,
}

/// One entry of any kind, as returned by [`Directory::lookup`].
#[derive(Clone, Copy, Debug)]
pub enum Entry<'a> {
    /// A regular file.
    File(&'a FileEntry),
    /// A subdirectory.
    Dir(&'a DirEntry),
    /// A symbolic link.
    Symlink(&'a SymlinkEntry),
}

/// A REAPI `Directory` that passed validation: every name is a single non-empty component
/// (no `/`, NUL, `.` or `..`), each list is strictly sorted, names are unique across the three
/// lists, and every digest is well formed. Only [`Directory::validate`] builds one, so code
/// holding a `Directory` never sees a hostile message.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Directory {
    /// Files, sorted by name.
    pub files: Vec<FileEntry>,
    /// Subdirectories, sorted by name.
    pub dirs: Vec<DirEntry>,
    /// Symlinks, sorted by name.
    pub symlinks: Vec<SymlinkEntry>,
}

/// Checks one path component; returns why it is not acceptable.
pub fn check_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() {
        return Err("empty name".into());
    }
    if name == "." || name == ".." {
        return Err(format!("name {name:?} is not allowed"));
    }
    if name.contains('/') {
        return Err(format!("name {name:?} contains '/'"));
    }
    if name.contains('\0') {
        return Err(format!("name {name:?} contains NUL"));
    }
    Ok(())
}

fn invalid(label: &str, reason: String) -> Error {
    Error::InvalidDirectory { digest: label.to_string(), reason }
}

/// Empties a digest field for the next merge, keeping its buffer.
fn reset_digest(d: &mut Option<reapi::Digest>) {
    let d = d.get_or_insert_with(Default::default);
    d.hash.clear();
    d.size_bytes = 0;
}

/// An entry's digest; `function` is the parent's (a tree uses one function throughout), or
/// None to infer it from the hash length.
fn entry_digest(
    name: &str,
    d: &Option<reapi::Digest>,
    label: &str,
    function: Option<DigestFunction>,
) -> Result<Digest> {
    let d = d.as_ref().filter(|d| !d.hash.is_empty());
    let d = d.ok_or_else(|| invalid(label, format!("entry {name:?} has no digest")))?;
    let parsed = match function {
        Some(f) => Digest::from_proto_with(f, d),
        None => Digest::try_from(d),
    };
    parsed.map_err(|e| invalid(label, format!("entry {name:?}: {e}")))
}

fn check_sorted<'a>(kind: &str, names: impl Iterator<Item = &'a str>) -> std::result::Result<(), String> {
    let mut prev: Option<&str> = None;
    for name in names {
        check_name(name)?;
        if let Some(p) = prev {
            if p == name {
                return Err(format!("duplicate {kind} name {name:?}"));
            }
            if p > name {
                return Err(format!("{kind} names not sorted: {p:?} before {name:?}"));
            }
        }
        prev = Some(name);
    }
    Ok(())
}

impl Directory {
    /// Validates a decoded message. `label` names it in errors (usually its digest).
    pub fn validate(msg: &reapi::Directory, label: &str) -> Result<Self> {
        let mut dir = Directory::default();
        for f in &msg.files {
            dir.push_file(f.clone(), label)?;
        }
        for d in &msg.directories {
            dir.push_dir(d.clone(), label)?;
        }
        for s in &msg.symlinks {
            dir.push_symlink(s.clone(), label)?;
        }
        dir.check(label)?;
        Ok(dir)
    }

    fn push_file(&mut self, f: reapi::FileNode, label: &str) -> Result<()> {
        let digest = entry_digest(&f.name, &f.digest, label, None)?;
        self.files.push(FileEntry { name: f.name.into(), digest, executable: f.is_executable });
        Ok(())
    }

    fn push_dir(&mut self, d: reapi::DirectoryNode, label: &str) -> Result<()> {
        let digest = entry_digest(&d.name, &d.digest, label, None)?;
        self.dirs.push(DirEntry { name: d.name.into(), digest });
        Ok(())
    }

    fn push_symlink(&mut self, s: reapi::SymlinkNode, label: &str) -> Result<()> {
        if s.target.is_empty() || s.target.contains('\0') {
            return Err(invalid(label, format!("symlink {:?} has an empty or NUL target", s.name)));
        }
        self.symlinks.push(SymlinkEntry { name: s.name, target: s.target });
        Ok(())
    }

    /// The rules on names: each list strictly sorted, no name in two lists.
    fn check(&self, label: &str) -> Result<()> {
        let bad = |reason: String| invalid(label, reason);
        check_sorted("file", self.files.iter().map(|f| f.name.as_str())).map_err(bad)?;
        check_sorted("directory", self.dirs.iter().map(|d| d.name.as_str())).map_err(bad)?;
        check_sorted("symlink", self.symlinks.iter().map(|s| s.name.as_str())).map_err(bad)?;
        if !self.dirs.is_empty() || !self.symlinks.is_empty() {
            let mut all: Vec<&str> = self.names().collect();
            all.sort_unstable();
            if let Some(w) = all.windows(2).find(|w| w[0] == w[1]) {
                return Err(bad(format!("name {:?} used by two entries of different kinds", w[0])));
            }
        }
        Ok(())
    }

    /// Decodes and validates the bytes of a Directory blob stored under `digest`. Entries are
    /// decoded one at a time straight into their validated form, so a Directory of a million
    /// entries never exists twice in memory (a whole decoded message costs ~3x the final one).
    /// Entries' digests are read with `digest`'s function.
    pub fn decode(digest: &Digest, bytes: &[u8]) -> Result<Self> {
        use prost::encoding::{decode_key, decode_varint, skip_field, DecodeContext, WireType};
        let label = digest.to_string();
        let function = Some(digest.function());
        let wire = |e: prost::DecodeError| invalid(&label, format!("not a Directory message: {e}"));
        let mut buf = bytes;
        let mut dir = Directory::default();
        // One message per kind, merged into again for each entry: its digest's buffer is
        // reused, so a million entries allocate only their names, packed together (a fresh
        // message per entry left a freed hash between every two names).
        let (mut file, mut sub) = (reapi::FileNode::default(), reapi::DirectoryNode::default());
        while !buf.is_empty() {
            let (tag, wt) = decode_key(&mut buf).map_err(wire)?;
            if !matches!(tag, 1 | 2 | 3 | 5) {
                skip_field(wt, tag, &mut buf, DecodeContext::default()).map_err(wire)?;
                continue;
            }
            if wt != WireType::LengthDelimited {
                return Err(invalid(&label, format!("not a Directory message: field {tag} has wire type {wt:?}")));
            }
            let len = decode_varint(&mut buf).map_err(wire)?;
            if len > buf.len() as u64 {
                return Err(invalid(&label, "not a Directory message: buffer underflow".into()));
            }
            let (item, rest) = buf.split_at(len as usize);
            buf = rest;
            match tag {
                1 => {
                    reset_digest(&mut file.digest);
                    (file.is_executable, file.node_properties) = (false, None);
                    file.merge(item).map_err(wire)?;
                    let digest = entry_digest(&file.name, &file.digest, &label, function)?;
                    let name = CompactString::new(&file.name);
                    dir.files.push(FileEntry { name, digest, executable: file.is_executable });
                }
                2 => {
                    reset_digest(&mut sub.digest);
                    sub.merge(item).map_err(wire)?;
                    let digest = entry_digest(&sub.name, &sub.digest, &label, function)?;
                    dir.dirs.push(DirEntry { name: CompactString::new(&sub.name), digest });
                }
                3 => dir.push_symlink(reapi::SymlinkNode::decode(item).map_err(wire)?, &label)?,
                _ => drop(reapi::NodeProperties::decode(item).map_err(wire)?),
            }
        }
        dir.check(&label)?;
        dir.files.shrink_to_fit();
        Ok(dir)
    }

    /// All entry names, files first, then directories, then symlinks.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        let f = self.files.iter().map(|e| e.name.as_str());
        let d = self.dirs.iter().map(|e| e.name.as_str());
        let s = self.symlinks.iter().map(|e| e.name.as_str());
        f.chain(d).chain(s)
    }

    /// Number of entries of all kinds.
    pub fn len(&self) -> usize {
        self.files.len() + self.dirs.len() + self.symlinks.len()
    }

    /// True when the directory has no entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Finds an entry by name (binary search in each sorted list).
    pub fn lookup(&self, name: &str) -> Option<Entry<'_>> {
        if let Ok(i) = self.files.binary_search_by(|e| e.name.as_str().cmp(name)) {
            return Some(Entry::File(&self.files[i]));
        }
        if let Ok(i) = self.dirs.binary_search_by(|e| e.name.as_str().cmp(name)) {
            return Some(Entry::Dir(&self.dirs[i]));
        }
        if let Ok(i) = self.symlinks.binary_search_by(|e| e.name.as_str().cmp(name)) {
            return Some(Entry::Symlink(&self.symlinks[i]));
        }
        None
    }

    /// The wire message (canonical: sorted lists, no node properties).
    pub fn to_proto(&self) -> reapi::Directory {
        reapi::Directory {
            files: self
                .files
                .iter()
                .map(|f| reapi::FileNode {
                    name: f.name.to_string(),
                    digest: Some(f.digest.into()),
                    is_executable: f.executable,
                    node_properties: None,
                })
                .collect(),
            directories: self
                .dirs
                .iter()
                .map(|d| reapi::DirectoryNode { name: d.name.to_string(), digest: Some(d.digest.into()) })
                .collect(),
            symlinks: self
                .symlinks
                .iter()
                .map(|s| reapi::SymlinkNode { name: s.name.clone(), target: s.target.clone(), node_properties: None })
                .collect(),
            node_properties: None,
        }
    }

    /// Canonical encoding and its SHA-256 digest.
    pub fn encode(&self) -> (Digest, Vec<u8>) {
        self.encode_with(DigestFunction::Sha256)
    }

    /// Canonical encoding and its digest under `function`.
    pub fn encode_with(&self, function: DigestFunction) -> (Digest, Vec<u8>) {
        Digest::of_message_with(function, &self.to_proto())
    }
}

/// A local file that a tree references, to be uploaded from disk.
#[derive(Clone, Debug)]
pub struct LocalFile {
    /// Digest of its contents.
    pub digest: Digest,
    /// Where to read it.
    pub path: PathBuf,
}

/// Counts gathered while building a tree.
#[derive(Clone, Copy, Debug, Default)]
pub struct TreeStats {
    /// Regular files (with repeats).
    pub files: u64,
    /// Directories, root included.
    pub dirs: u64,
    /// Symlinks.
    pub symlinks: u64,
    /// Bytes of file content (with repeats).
    pub bytes: u64,
}

/// The canonical Directory tree of a local folder: the root digest, every distinct Directory
/// message (encoded) and one local path for every distinct file digest.
#[derive(Debug)]
pub struct LocalTree {
    /// Digest of the root Directory.
    pub root: Digest,
    /// Every distinct Directory, keyed by digest, with its canonical bytes.
    pub directories: BTreeMap<Digest, Vec<u8>>,
    /// One local source per distinct file digest.
    pub files: HashMap<Digest, PathBuf>,
    /// What was walked.
    pub stats: TreeStats,
}

/// Scan of one folder before hashing.
#[derive(Default)]
struct Scan {
    files: Vec<(String, usize, bool)>,
    dirs: Vec<(String, Scan)>,
    symlinks: Vec<(String, String)>,
}

fn utf8_name(path: &Path, name: std::ffi::OsString) -> Result<String> {
    name.into_string().map_err(|n| Error::InvalidArgument(format!("{}: name {n:?} is not UTF-8", path.display())))
}

fn scan(dir: &Path, paths: &mut Vec<(PathBuf, u64)>, stats: &mut TreeStats) -> Result<Scan> {
    let mut out = Scan::default();
    stats.dirs += 1;
    let rd = std::fs::read_dir(dir).ctx(|| format!("reading directory {}", dir.display()))?;
    for ent in rd {
        let ent = ent.ctx(|| format!("reading directory {}", dir.display()))?;
        let path = ent.path();
        let name = utf8_name(dir, ent.file_name())?;
        let meta = std::fs::symlink_metadata(&path).ctx(|| format!("stat {}", path.display()))?;
        let ft = meta.file_type();
        if ft.is_symlink() {
            let target = std::fs::read_link(&path).ctx(|| format!("readlink {}", path.display()))?;
            let target = target
                .into_os_string()
                .into_string()
                .map_err(|t| Error::InvalidArgument(format!("{}: target {t:?} is not UTF-8", path.display())))?;
            stats.symlinks += 1;
            out.symlinks.push((name, target));
        } else if ft.is_dir() {
            let sub = scan(&path, paths, stats)?;
            out.dirs.push((name, sub));
        } else if ft.is_file() {
            let exec = meta.permissions().mode() & 0o111 != 0;
            stats.files += 1;
            stats.bytes += meta.len();
            out.files.push((name, paths.len(), exec));
            paths.push((path, meta.len()));
        } else {
            return Err(Error::InvalidArgument(format!(
                "{}: not a regular file, directory or symlink",
                path.display()
            )));
        }
    }
    out.files.sort_by(|a, b| a.0.cmp(&b.0));
    out.dirs.sort_by(|a, b| a.0.cmp(&b.0));
    out.symlinks.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Hashes every file with one thread per core; `progress` is called with bytes hashed.
fn hash_all(f: DigestFunction, paths: &[(PathBuf, u64)], progress: &(dyn Fn(u64) + Sync)) -> Result<Vec<Digest>> {
    let next = AtomicUsize::new(0);
    let out: Mutex<Vec<Option<Digest>>> = Mutex::new(vec![None; paths.len()]);
    let first_err: Mutex<Option<Error>> = Mutex::new(None);
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).min(8);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= paths.len() || first_err.lock().unwrap().is_some() {
                    break;
                }
                let (path, _) = &paths[i];
                match hash_file_with(f, path) {
                    Ok(d) => {
                        progress(d.size());
                        out.lock().unwrap()[i] = Some(d);
                    }
                    Err(e) => {
                        *first_err.lock().unwrap() = Some(Error::io(format!("hashing {}", path.display()), e));
                    }
                }
            });
        }
    });
    if let Some(e) = first_err.into_inner().unwrap() {
        return Err(e);
    }
    Ok(out.into_inner().unwrap().into_iter().map(|d| d.expect("every file hashed")).collect())
}

fn assemble(
    f: DigestFunction,
    scan: &Scan,
    digests: &[Digest],
    paths: &[(PathBuf, u64)],
    tree: &mut LocalTree,
) -> Digest {
    let mut dir = Directory::default();
    for (name, idx, exec) in &scan.files {
        let digest = digests[*idx];
        tree.files.entry(digest).or_insert_with(|| paths[*idx].0.clone());
        dir.files.push(FileEntry { name: CompactString::new(name), digest, executable: *exec });
    }
    for (name, sub) in &scan.dirs {
        let digest = assemble(f, sub, digests, paths, tree);
        dir.dirs.push(DirEntry { name: CompactString::new(name), digest });
    }
    for (name, target) in &scan.symlinks {
        dir.symlinks.push(SymlinkEntry { name: name.clone(), target: target.clone() });
    }
    let (digest, bytes) = dir.encode_with(f);
    tree.directories.entry(digest).or_insert(bytes);
    digest
}

/// Builds the canonical Directory tree of a local folder. Files are hashed in parallel;
/// `progress` receives the bytes of each file as it is hashed.
pub fn build_local_tree(root: &Path, progress: &(dyn Fn(u64) + Sync)) -> Result<LocalTree> {
    build_local_tree_with(DigestFunction::Sha256, root, progress)
}

/// [`build_local_tree`] with files and Directory messages hashed by `f`.
pub fn build_local_tree_with(f: DigestFunction, root: &Path, progress: &(dyn Fn(u64) + Sync)) -> Result<LocalTree> {
    let meta = std::fs::metadata(root).ctx(|| format!("stat {}", root.display()))?;
    if !meta.is_dir() {
        return Err(Error::InvalidArgument(format!("{} is not a directory", root.display())));
    }
    let mut stats = TreeStats::default();
    let mut paths = Vec::new();
    let scanned = scan(root, &mut paths, &mut stats)?;
    let digests = hash_all(f, &paths, progress)?;
    let mut tree = LocalTree { root: crate::digest::EMPTY, directories: BTreeMap::new(), files: HashMap::new(), stats };
    tree.root = assemble(f, &scanned, &digests, &paths, &mut tree);
    Ok(tree)
}

/// Total bytes a scan would hash, for sizing a progress bar before the walk (cheap `du`).
pub fn count_bytes(root: &Path) -> u64 {
    fn walk(p: &Path) -> u64 {
        let Ok(rd) = std::fs::read_dir(p) else {
            return 0;
        };
        rd.flatten()
            .map(|e| match e.file_type() {
                Ok(t) if t.is_dir() => walk(&e.path()),
                Ok(t) if t.is_file() => e.metadata().map(|m| m.len()).unwrap_or(0),
                _ => 0,
            })
            .sum()
    }
    walk(root)
}
