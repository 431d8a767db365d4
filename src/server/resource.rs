//! ByteStream resource names: `{instance}/blobs/{hash}/{size}` and the upload form.

use crate::digest::{Digest, DigestFunction};
use crate::error::{Error, Result};

/// A parsed ByteStream resource name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    /// Instance name ("" for the default).
    pub instance: String,
    /// The blob.
    pub digest: Digest,
    /// `Some(name)` for `compressed-blobs/{name}/…`.
    pub compressor: Option<String>,
}

fn bad(name: &str, why: &str) -> Error {
    let shown: String = name.chars().take(200).collect();
    Error::InvalidArgument(format!("resource name {shown:?}: {why}"))
}

/// Parses what follows the instance: `blobs/[df/]hash/size…` or `compressed-blobs/c/[df/]hash/size…`.
fn parse_blob_part(name: &str, parts: &[&str], instance: String, allow_trailing: bool) -> Result<Resource> {
    let (compressor, rest) = match parts.first() {
        Some(&"blobs") => (None, &parts[1..]),
        Some(&"compressed-blobs") if parts.len() > 1 => (Some(parts[1].to_string()), &parts[2..]),
        _ => return Err(bad(name, "expected blobs/ or compressed-blobs/")),
    };
    // A function segment names the function; without one, the hash length decides.
    let (function, rest) = match rest.first().and_then(|df| DigestFunction::from_name(df)) {
        Some(f) => (Some(f), &rest[1..]),
        None => (None, rest),
    };
    if rest.len() < 2 || (!allow_trailing && rest.len() > 2) {
        return Err(bad(name, "expected …/HASH/SIZE"));
    }
    let size: i64 = rest[1].parse().map_err(|_| bad(name, "size is not a number"))?;
    let digest = match function {
        Some(f) => Digest::from_parts_with(f, rest[0], size),
        None => Digest::from_parts(rest[0], size),
    }
    .map_err(|e| bad(name, &e.to_string()))?;
    Ok(Resource { instance, digest, compressor })
}

fn check_instance(name: &str, segs: &[&str]) -> Result<String> {
    for s in segs {
        if s.is_empty() || matches!(*s, "blobs" | "uploads" | "compressed-blobs" | "actions" | "operations") {
            return Err(bad(name, "bad instance name segment"));
        }
    }
    Ok(segs.join("/"))
}

/// Parses a read name: `[instance/]blobs/[df/]HASH/SIZE` (or `compressed-blobs/C/…`).
pub fn parse_read(name: &str) -> Result<Resource> {
    let parts: Vec<&str> = name.split('/').collect();
    let at = parts
        .iter()
        .position(|p| *p == "blobs" || *p == "compressed-blobs")
        .ok_or_else(|| bad(name, "no blobs/ segment"))?;
    let instance = check_instance(name, &parts[..at])?;
    parse_blob_part(name, &parts[at..], instance, false)
}

/// Parses an upload name: `[instance/]uploads/UUID/blobs/[df/]HASH/SIZE[/anything]`.
pub fn parse_write(name: &str) -> Result<Resource> {
    let parts: Vec<&str> = name.split('/').collect();
    let at = parts.iter().position(|p| *p == "uploads").ok_or_else(|| bad(name, "no uploads/ segment"))?;
    let instance = check_instance(name, &parts[..at])?;
    if parts.len() < at + 2 || parts[at + 1].is_empty() {
        return Err(bad(name, "missing upload id after uploads/"));
    }
    parse_blob_part(name, &parts[at + 2..], instance, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn read_names() {
        let r = parse_read(&format!("blobs/{H}/0")).unwrap();
        assert_eq!(r.instance, "");
        assert!(r.digest.is_empty_blob());
        let r = parse_read(&format!("a/b/blobs/sha256/{H}/0")).unwrap();
        assert_eq!(r.instance, "a/b");
        let r = parse_read(&format!("blobs/blake3/{H}/0")).unwrap();
        assert_eq!(r.digest.function(), DigestFunction::Blake3);
        assert!(!r.digest.is_empty_blob(), "a SHA-256 hash named as BLAKE3 is another blob");
        let sha1 = "da39a3ee5e6b4b0d3255bfef95601890afd80709";
        assert_eq!(parse_read(&format!("blobs/{sha1}/0")).unwrap().digest.function(), DigestFunction::Sha1);
        let r = parse_write(&format!("i/uploads/u/blobs/sha1/{sha1}/0")).unwrap();
        assert!(r.digest.is_empty_blob() && r.digest.function() == DigestFunction::Sha1);
        assert!(parse_read(&format!("blobs/sha1/{H}/0")).is_err(), "length must fit the named function");
        let r = parse_read(&format!("compressed-blobs/zstd/blake3/{H}/0")).unwrap();
        assert_eq!((r.compressor.as_deref(), r.digest.function()), (Some("zstd"), DigestFunction::Blake3));
        let r = parse_read(&format!("x/compressed-blobs/zstd/{H}/0")).unwrap();
        assert_eq!(r.compressor.as_deref(), Some("zstd"));
        for bad in [
            "",
            "blobs",
            "blobs/zz/1",
            &format!("blobs/{H}"),
            &format!("blobs/{H}/-1"),
            &format!("blobs/{H}/0/x"),
            &format!("a//blobs/{H}/0"),
        ] {
            assert!(parse_read(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn write_names() {
        let r = parse_write(&format!("inst/uploads/123e4567/blobs/{H}/0/meta/data")).unwrap();
        assert_eq!(r.instance, "inst");
        assert!(parse_write(&format!("uploads//blobs/{H}/0")).is_err());
        assert!(parse_write(&format!("blobs/{H}/0")).is_err());
        assert!(parse_write(&format!("uploads/u/blobs/{H}/abc")).is_err());
    }
}
