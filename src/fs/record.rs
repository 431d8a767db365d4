//! Records which paths of a mounted input root were looked up while an action ran, for its
//! access profile (the executor stores it; `prefetch.rs` replays it at the next run). The
//! record is bounded: past [`MAX_ENTRIES`] paths or [`MAX_PATH_BYTES`] bytes of paths it
//! stops growing and says it was truncated.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use crate::digest::Digest;

/// Most paths one record keeps.
pub const MAX_ENTRIES: usize = 100_000;
/// Most bytes of paths one record keeps.
pub const MAX_PATH_BYTES: usize = 8 << 20;

/// One looked-up path, relative to the input root (no leading `/`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Entry {
    /// Slash-separated relative path.
    pub path: String,
    /// A directory (else a file).
    pub dir: bool,
}

#[derive(Default)]
struct State {
    paths: HashMap<String, bool>,
    files: HashSet<Digest>,
    bytes: usize,
    truncated: bool,
}

/// What one run looked up.
#[derive(Default)]
pub struct Recorder {
    state: Mutex<State>,
}

/// A finished record.
#[derive(Clone, Debug, Default)]
pub struct Recorded {
    /// Looked-up paths, sorted.
    pub entries: Vec<Entry>,
    /// Contents of the looked-up files.
    pub files: HashSet<Digest>,
    /// The caps were reached: later lookups are missing.
    pub truncated: bool,
}

impl Recorder {
    /// An empty record.
    pub fn new() -> Self {
        Recorder::default()
    }

    /// Notes a lookup of `name` in the directory at `dir` (as `Inodes::path` gives it: `/`,
    /// `/a/b`). `file` is the content of a file; `None` for a directory. Names a profile
    /// could not hold (a newline) are left out.
    pub fn note(&self, dir: &str, name: &str, file: Option<Digest>) {
        if name.contains('\n') || dir.contains('\n') || dir.contains("/?") {
            return;
        }
        let dir = dir.trim_matches('/');
        let path = if dir.is_empty() { name.to_string() } else { format!("{dir}/{name}") };
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.paths.contains_key(&path) {
            return;
        }
        if s.paths.len() >= MAX_ENTRIES || s.bytes + path.len() > MAX_PATH_BYTES {
            s.truncated = true;
            return;
        }
        s.bytes += path.len();
        if let Some(d) = file {
            s.files.insert(d);
        }
        s.paths.insert(path, file.is_none());
    }

    /// Whether a file with this content was looked up.
    pub fn saw_file(&self, digest: &Digest) -> bool {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).files.contains(digest)
    }

    /// The record so far, sorted.
    pub fn snapshot(&self) -> Recorded {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut entries: Vec<Entry> = s.paths.iter().map(|(p, d)| Entry { path: p.clone(), dir: *d }).collect();
        entries.sort();
        Recorded { entries, files: s.files.clone(), truncated: s.truncated }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_relative_sorted_and_deduplicated() {
        let r = Recorder::new();
        r.note("/", "b", None);
        r.note("/b", "x", Some(Digest::of_bytes(b"x")));
        r.note("/b", "x", Some(Digest::of_bytes(b"x")));
        r.note("/", "a\nb", None);
        let got = r.snapshot();
        assert_eq!(got.entries, vec![Entry { path: "b".into(), dir: true }, Entry { path: "b/x".into(), dir: false }]);
        assert!(r.saw_file(&Digest::of_bytes(b"x")));
        assert!(!got.truncated);
    }

    #[test]
    fn the_record_is_bounded() {
        let r = Recorder::new();
        for i in 0..MAX_ENTRIES + 10 {
            r.note("/", &format!("f{i}"), None);
        }
        let got = r.snapshot();
        assert_eq!(got.entries.len(), MAX_ENTRIES);
        assert!(got.truncated);
    }
}
