//! Blob and action-cache file names per digest function (SHA-256 keeps the original layout).

use crate::digest::{Digest, DigestError, DigestFunction};

/// A blob's file name: `stem` (its hex, or hex-size) for SHA-256, as stores always had, and
/// `FUNCTION.stem` for other functions, so equal hashes of two functions never share a file.
pub(super) fn name_of(digest: &Digest, stem: String) -> String {
    match digest.function() {
        DigestFunction::Sha256 => stem,
        f => format!("{f}.{stem}"),
    }
}

/// The digest a blob file name stands for (see [`name_of`]).
pub(super) fn digest_of_name(name: &str, size: u64) -> std::result::Result<Digest, DigestError> {
    match name.split_once('.') {
        Some((f, hex)) => match DigestFunction::from_name(f) {
            Some(f) if f != DigestFunction::Sha256 => Digest::from_parts_with(f, hex, size as i64),
            _ => Err(DigestError::Form(name.to_string())),
        },
        None => Digest::from_parts_with(DigestFunction::Sha256, name, size as i64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_names_are_unchanged_and_others_are_prefixed() {
        for f in DigestFunction::ALL {
            let d = Digest::of_bytes_with(f, b"x");
            let name = name_of(&d, d.hash_hex());
            assert_eq!(name == d.hash_hex(), f == DigestFunction::Sha256, "{name}");
            assert_eq!(digest_of_name(&name, 1).unwrap(), d);
        }
        assert!(digest_of_name("sha256.00", 1).is_err());
        assert!(digest_of_name("nonsense.00", 1).is_err());
    }
}
