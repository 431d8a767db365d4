//! Output capture: walks the declared outputs without following symlinks, reuses the
//! digests of files the command did not change, builds canonical Trees for directories.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::spec::{OutputKind, OutputSpec};
use crate::digest::{hash_file_with, Digest, DigestFunction};
use crate::error::{Error, IoContext, Result};
use crate::proto::reapi;
use crate::tree::{DirEntry, Directory, FileEntry, SymlinkEntry};

/// Where a blob to upload comes from.
#[derive(Clone, Debug)]
pub enum Source {
    /// A file on local disk.
    File(PathBuf),
    /// Bytes in memory (Directory and Tree messages).
    Bytes(Bytes),
}

/// What capture found: the ActionResult's output fields and the blobs they need.
#[derive(Debug, Default)]
pub struct Captured {
    /// Output files.
    pub files: Vec<reapi::OutputFile>,
    /// Output directories (as Trees).
    pub dirs: Vec<reapi::OutputDirectory>,
    /// Output symlinks (all kinds).
    pub symlinks: Vec<reapi::OutputSymlink>,
    /// Symlinks declared as output files (v2.0 field).
    pub file_symlinks: Vec<reapi::OutputSymlink>,
    /// Symlinks declared as output directories (v2.0 field).
    pub dir_symlinks: Vec<reapi::OutputSymlink>,
    /// Every blob the outputs reference, with where to read it.
    pub blobs: HashMap<Digest, Source>,
    /// Bytes hashed (files the command wrote).
    pub hashed_bytes: u64,
    /// Files whose digest came from the input root (not re-hashed).
    pub reused_files: u64,
}

/// Tells whether a path (relative to the root) was left as the input root had it, and if so
/// its digest: `None` means "changed or new, hash it".
pub trait Unchanged: Sync {
    /// The input digest of `rel` if the command did not touch it.
    fn digest(&self, rel: &Path) -> Option<Digest>;
}

/// Never reuses: every file is hashed.
pub struct HashEverything;

impl Unchanged for HashEverything {
    fn digest(&self, _rel: &Path) -> Option<Digest> {
        None
    }
}

struct Walk<'a> {
    function: DigestFunction,
    root: &'a Path,
    unchanged: &'a dyn Unchanged,
    out: &'a mut Captured,
}

impl Walk<'_> {
    fn file_digest(&mut self, abs: &Path, rel: &Path) -> Result<Digest> {
        if let Some(d) = self.unchanged.digest(rel) {
            self.out.reused_files += 1;
            self.out.blobs.entry(d).or_insert_with(|| Source::File(abs.to_path_buf()));
            return Ok(d);
        }
        let d = hash_file_with(self.function, abs).ctx(|| format!("hashing output {}", rel.display()))?;
        self.out.hashed_bytes += d.size();
        self.out.blobs.entry(d).or_insert_with(|| Source::File(abs.to_path_buf()));
        Ok(d)
    }

    /// Builds the canonical Directory of `rel`, recording every child Directory.
    fn dir(&mut self, rel: &Path, children: &mut BTreeMap<Digest, reapi::Directory>) -> Result<Directory> {
        let abs = self.root.join(rel);
        let mut dir = Directory::default();
        let rd = std::fs::read_dir(&abs).ctx(|| format!("reading output directory {}", rel.display()))?;
        for e in rd {
            let e = e.ctx(|| format!("reading output directory {}", rel.display()))?;
            let Ok(name) = e.file_name().into_string() else {
                tracing::warn!(dir = %rel.display(), "skipping a non-UTF-8 name in an output directory");
                continue;
            };
            let child_rel = rel.join(&name);
            let child_abs = self.root.join(&child_rel);
            let meta = std::fs::symlink_metadata(&child_abs).ctx(|| format!("stat {}", child_rel.display()))?;
            let ft = meta.file_type();
            if ft.is_symlink() {
                let target = std::fs::read_link(&child_abs).ctx(|| format!("readlink {}", child_rel.display()))?;
                dir.symlinks.push(SymlinkEntry { name, target: target.to_string_lossy().into_owned() });
            } else if ft.is_dir() {
                let sub = self.dir(&child_rel, children)?;
                let proto = sub.to_proto();
                let (digest, bytes) = sub.encode_with(self.function);
                self.out.blobs.entry(digest).or_insert_with(|| Source::Bytes(bytes.into()));
                children.insert(digest, proto);
                dir.dirs.push(DirEntry { name: name.into(), digest });
            } else if ft.is_file() {
                let digest = self.file_digest(&child_abs, &child_rel)?;
                dir.files.push(FileEntry {
                    name: name.into(),
                    digest,
                    executable: meta.permissions().mode() & 0o111 != 0,
                });
            }
        }
        dir.files.sort_by(|a, b| a.name.cmp(&b.name));
        dir.dirs.sort_by(|a, b| a.name.cmp(&b.name));
        dir.symlinks.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(dir)
    }
}

/// Refuses a path whose parents are not plain directories (a symlinked parent could lead
/// out of the root). Returns the metadata of the path itself, `None` when it is absent.
/// Command.OutputDirectoryFormat.DIRECTORY_ONLY (REAPI number).
const DIRECTORY_ONLY: i32 = 1;

fn safe_lstat(root: &Path, rel: &Path) -> Result<Option<std::fs::Metadata>> {
    let mut cur = root.to_path_buf();
    let parts: Vec<_> = rel.components().collect();
    for (i, c) in parts.iter().enumerate() {
        cur.push(c);
        match std::fs::symlink_metadata(&cur) {
            Ok(m) if i + 1 == parts.len() => return Ok(Some(m)),
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(Error::InvalidArgument(format!(
                    "output {} goes through {} which is not a directory",
                    rel.display(),
                    cur.display()
                )))
            }
            Err(_) => return Ok(None),
        }
    }
    std::fs::symlink_metadata(root).map(Some).ctx(|| format!("stat {}", root.display()))
}

/// Captures `outputs` below `root`. Missing outputs are left out; an output declared as a
/// file that is a directory is FAILED_PRECONDITION (rule 16).
/// Files and Directory messages are hashed with `function`. `format` is
/// Command.output_directory_format: DIRECTORY_ONLY gives output directories only a root
/// Directory (every Directory message uploaded, no Tree); TREE_ONLY and TREE_AND_DIRECTORY
/// get both, since the Directory digest costs nothing more and casfs's own views use it.
pub fn capture_with(
    function: DigestFunction,
    format: i32,
    root: &Path,
    outputs: &[OutputSpec],
    unchanged: &dyn Unchanged,
) -> Result<Captured> {
    let mut out = Captured::default();
    for o in outputs {
        let rel = Path::new(&o.in_root);
        let meta = match safe_lstat(root, rel) {
            Ok(Some(m)) => m,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(output = %o.path, error = %e, "output left out");
                continue;
            }
        };
        let ft = meta.file_type();
        if ft.is_symlink() {
            let target = std::fs::read_link(root.join(rel)).ctx(|| format!("readlink {}", o.path))?;
            let s = reapi::OutputSymlink {
                path: o.path.clone(),
                target: target.to_string_lossy().into_owned(),
                node_properties: None,
            };
            match o.kind {
                OutputKind::File => out.file_symlinks.push(s.clone()),
                OutputKind::Directory => out.dir_symlinks.push(s.clone()),
                OutputKind::Any => {}
            }
            out.symlinks.push(s);
        } else if ft.is_dir() {
            if o.kind == OutputKind::File {
                return Err(Error::FailedPrecondition(format!("output file {} is a directory", o.path)));
            }
            let mut children = BTreeMap::new();
            let mut w = Walk { function, root, unchanged, out: &mut out };
            let dir = w.dir(rel, &mut children)?;
            let root_proto = dir.to_proto();
            let (root_digest, root_bytes) = dir.encode_with(function);
            // Sub-Directories were added as blobs by the walk; the root is added here.
            out.blobs.entry(root_digest).or_insert_with(|| Source::Bytes(root_bytes.into()));
            let tree_digest = (format != DIRECTORY_ONLY).then(|| {
                let tree = reapi::Tree { root: Some(root_proto), children: children.into_values().collect() };
                let (tree_digest, tree_bytes) = Digest::of_message_with(function, &tree);
                out.blobs.insert(tree_digest, Source::Bytes(tree_bytes.into()));
                tree_digest.to_proto()
            });
            out.dirs.push(reapi::OutputDirectory {
                path: o.path.clone(),
                tree_digest,
                is_topologically_sorted: false,
                root_directory_digest: Some(root_digest.to_proto()),
            });
        } else if ft.is_file() {
            if o.kind == OutputKind::Directory {
                return Err(Error::FailedPrecondition(format!("output directory {} is a file", o.path)));
            }
            let mut w = Walk { function, root, unchanged, out: &mut out };
            let digest = w.file_digest(&root.join(rel), rel)?;
            out.files.push(reapi::OutputFile {
                path: o.path.clone(),
                digest: Some(digest.to_proto()),
                is_executable: meta.permissions().mode() & 0o111 != 0,
                contents: Bytes::new(),
                node_properties: None,
            });
        }
    }
    Ok(out)
}
