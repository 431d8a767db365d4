//! Instances: named REAPI deployments behind one endpoint, each with its own stores and its
//! own Execution service, found by the `instance_name` of every request.
//!
//! Without named instances one [`Backend`] answers every instance name (today's default:
//! one namespace for all). With them, a request naming an instance the server does not
//! know is refused with INVALID_ARGUMENT listing the known names, so a typo in a client's
//! instance name fails loudly instead of working against the wrong deployment.

use std::collections::BTreeMap;

use tonic::Status;

use super::Backend;
use crate::error::{Error, Result};

/// Longest instance name a server accepts in its configuration.
pub const MAX_INSTANCE_NAME: usize = 256;

/// The backends of a server, by instance name.
#[derive(Clone)]
pub struct Instances {
    /// Serves every instance name when no instance is named.
    default: Option<Backend>,
    named: BTreeMap<String, Backend>,
}

impl From<Backend> for Instances {
    fn from(b: Backend) -> Self {
        Instances::single(b)
    }
}

impl Instances {
    /// One backend for every instance name.
    pub fn single(b: Backend) -> Self {
        Instances { default: Some(b), named: BTreeMap::new() }
    }

    /// Named backends: only these names are served. Names are checked with
    /// [`check_name`]; there must be at least one and no name twice.
    pub fn named(list: Vec<(String, Backend)>) -> Result<Self> {
        if list.is_empty() {
            return Err(Error::InvalidArgument("no instance configured".into()));
        }
        let mut named = BTreeMap::new();
        for (name, b) in list {
            check_name(&name)?;
            if named.insert(name.clone(), b).is_some() {
                return Err(Error::InvalidArgument(format!("instance {name:?} is configured twice")));
            }
        }
        Ok(Instances { default: None, named })
    }

    /// The backend serving `name`; INVALID_ARGUMENT naming the known instances otherwise.
    pub fn get(&self, name: &str) -> std::result::Result<&Backend, Status> {
        if let Some(b) = &self.default {
            return Ok(b);
        }
        self.named.get(name).ok_or_else(|| Status::invalid_argument(self.unknown(name)))
    }

    fn unknown(&self, name: &str) -> String {
        let shown: String = name.chars().take(100).collect();
        let more = if name.chars().count() > 100 { "…" } else { "" };
        let known: Vec<String> = self.named.keys().map(|k| format!("{k:?}")).collect();
        format!(
            "unknown instance name {shown:?}{more}: this server serves the instances {} (casfs serve --instance)",
            known.join(", ")
        )
    }

    /// Every backend, with its instance name (`None` for the one serving every name).
    pub fn iter(&self) -> impl Iterator<Item = (Option<&str>, &Backend)> {
        self.default.iter().map(|b| (None, b)).chain(self.named.iter().map(|(n, b)| (Some(n.as_str()), b)))
    }

    /// The backend whose server-wide settings (authentication, upload idle timeout, the
    /// Remote Asset downloader) the server uses.
    pub fn first(&self) -> &Backend {
        match &self.default {
            Some(b) => b,
            // `named` is never empty (checked in `named`).
            None => self.named.values().next().expect("at least one instance"),
        }
    }

    /// Whether some instance executes actions.
    pub fn any_execution(&self) -> bool {
        self.iter().any(|(_, b)| b.execution.is_some())
    }
}

/// Checks an instance name for a server's configuration: up to [`MAX_INSTANCE_NAME`] bytes of
/// `/`-separated segments of letters, digits, `-`, `_` and `.`, none empty, `.` or `..`, and
/// none of the words ByteStream resource names use (`blobs`, `uploads`, `compressed-blobs`,
/// `operations`, `actions`). The empty name (the REAPI default instance) is allowed.
pub fn check_name(name: &str) -> Result<()> {
    let bad = |why: &str| {
        let shown: String = name.chars().take(100).collect();
        Err(Error::InvalidArgument(format!("instance name {shown:?}: {why}")))
    };
    if name.is_empty() {
        return Ok(());
    }
    if name.len() > MAX_INSTANCE_NAME {
        return bad(&format!("longer than {MAX_INSTANCE_NAME} bytes"));
    }
    for seg in name.split('/') {
        if seg.is_empty() || seg == "." || seg == ".." {
            return bad("empty, `.` or `..` segment");
        }
        if matches!(seg, "blobs" | "uploads" | "compressed-blobs" | "operations" | "actions") {
            return bad(&format!("{seg:?} is a word of resource names"));
        }
        if !seg.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) {
            return bad("only letters, digits, `-`, `_`, `.` and `/` are allowed");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["", "a", "remote-execution", "team/a.b_c", "x/y/z"] {
            assert!(check_name(ok).is_ok(), "{ok:?} refused");
        }
        let long = "a".repeat(MAX_INSTANCE_NAME + 1);
        for bad in ["../x", "a/../b", "/a", "a/", "a//b", "blobs", "a/uploads", "sp ace", "é", &long] {
            assert!(check_name(bad).is_err(), "{bad:?} accepted");
        }
    }
}
