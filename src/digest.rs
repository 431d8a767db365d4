//! Content digests: the `Digest` value type, digest functions, text forms and hashing.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

use crate::proto::reapi;

/// Length in bytes of a SHA-256 hash.
pub const SHA256_LEN: usize = 32;

/// A hash function the store can key blobs by. Only SHA-256 is implemented; the enum is the
/// single place to add more (each needs a hash length and a hasher).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum DigestFunction {
    /// SHA-256, the function every REAPI server must support.
    #[default]
    Sha256,
}

impl DigestFunction {
    /// Every function this build supports, in order of preference.
    pub const ALL: [DigestFunction; 1] = [DigestFunction::Sha256];

    /// The REAPI `DigestFunction.Value` number.
    pub fn proto_value(self) -> i32 {
        match self {
            DigestFunction::Sha256 => reapi::digest_function::Value::Sha256 as i32,
        }
    }

    /// The lower-case name used in resource names and browse paths (`sha256`).
    pub fn name(self) -> &'static str {
        match self {
            DigestFunction::Sha256 => "sha256",
        }
    }

    /// Length of the hash in hex characters.
    pub fn hex_len(self) -> usize {
        match self {
            DigestFunction::Sha256 => SHA256_LEN * 2,
        }
    }

    /// Maps a request's `digest_function` field. `UNKNOWN` (0) means "infer from the hash
    /// length", which for us is SHA-256 (REAPI rule: unset means SHA-256 for 64-char hashes).
    pub fn from_proto(value: i32) -> Result<Self, DigestError> {
        match value {
            0 => Ok(DigestFunction::Sha256),
            v if v == reapi::digest_function::Value::Sha256 as i32 => Ok(DigestFunction::Sha256),
            v => Err(DigestError::UnsupportedFunction(v)),
        }
    }

    /// Parses a lower-case function name as used in resource names.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "sha256" => Some(DigestFunction::Sha256),
            _ => None,
        }
    }
}

/// Why a digest could not be parsed or accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    /// The text had no `/` or `-` between hash and size.
    #[error("expected HASH/SIZE or HASH-SIZE, got {0:?}")]
    Form(String),
    /// The hash has a character that is not hexadecimal.
    #[error("hash {0:?} is not hexadecimal")]
    BadHex(String),
    /// The hash is hexadecimal but has upper-case letters; REAPI hashes are lower-case, so
    /// an upper-case form would name the same blob twice.
    #[error("hash {0:?} has upper-case letters; digests are lower-case hex (0-9, a-f)")]
    UpperCase(String),
    /// The hash has the wrong number of characters for its function.
    #[error("hash has {got} hex characters, sha256 needs {want}")]
    WrongLength { got: usize, want: usize },
    /// The size is not a number.
    #[error("size {0:?} is not a number")]
    BadSize(String),
    /// The size is below zero.
    #[error("size {0} is negative")]
    NegativeSize(i64),
    /// The request asked for a digest function we do not implement.
    #[error("digest function {0} is not supported (only sha256)")]
    UnsupportedFunction(i32),
}

/// A blob's identity: its SHA-256 hash and its size in bytes. Always valid once built.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    hash: [u8; SHA256_LEN],
    size: u64,
}

/// The digest of the empty blob, which every store holds implicitly.
pub const EMPTY: Digest = Digest {
    hash: [
        0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f, 0xb9, 0x24, 0x27, 0xae,
        0x41, 0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b, 0x78, 0x52, 0xb8, 0x55,
    ],
    size: 0,
};

impl Digest {
    /// Builds a digest from raw hash bytes and a size.
    pub fn new(hash: [u8; SHA256_LEN], size: u64) -> Self {
        Digest { hash, size }
    }

    /// Hashes a whole buffer.
    pub fn of_bytes(data: &[u8]) -> Self {
        let mut h = Hasher::new();
        h.update(data);
        h.finish()
    }

    /// Hashes a protobuf message's canonical encoding; returns the digest and the bytes.
    pub fn of_message<M: prost::Message>(msg: &M) -> (Self, Vec<u8>) {
        let bytes = msg.encode_to_vec();
        (Digest::of_bytes(&bytes), bytes)
    }

    /// Parses a lower-case hex hash and a size, checking both. Upper-case hex is refused:
    /// the spec's form is lower case, and accepting both would give one blob two names.
    pub fn from_parts(hash_hex: &str, size: i64) -> Result<Self, DigestError> {
        if size < 0 {
            return Err(DigestError::NegativeSize(size));
        }
        let want = DigestFunction::Sha256.hex_len();
        if !hash_hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(DigestError::BadHex(truncate(hash_hex)));
        }
        if hash_hex.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(DigestError::UpperCase(truncate(hash_hex)));
        }
        if hash_hex.len() != want {
            return Err(DigestError::WrongLength { got: hash_hex.len(), want });
        }
        let mut hash = [0u8; SHA256_LEN];
        hex::decode_to_slice(hash_hex, &mut hash).map_err(|_| DigestError::BadHex(truncate(hash_hex)))?;
        Ok(Digest { hash, size: size as u64 })
    }

    /// Parses `hash/size` (Bazel's form) or `hash-size` (path form).
    pub fn parse(text: &str) -> Result<Self, DigestError> {
        let text = text.trim();
        let (hash, size) =
            text.rsplit_once('/').or_else(|| text.rsplit_once('-')).ok_or_else(|| DigestError::Form(truncate(text)))?;
        let size: i64 = match size.parse() {
            Ok(n) => n,
            Err(_) => return Err(DigestError::BadSize(truncate(size))),
        };
        Digest::from_parts(hash, size)
    }

    /// The raw hash bytes.
    pub fn hash_bytes(&self) -> &[u8; SHA256_LEN] {
        &self.hash
    }

    /// The hash as lower-case hex.
    pub fn hash_hex(&self) -> String {
        hex::encode(self.hash)
    }

    /// Size of the blob in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// True for the digest of the empty blob.
    pub fn is_empty_blob(&self) -> bool {
        *self == EMPTY
    }

    /// The path form `hash-size`, safe as a file name.
    pub fn to_path_form(&self) -> String {
        format!("{}-{}", self.hash_hex(), self.size)
    }

    /// The REAPI wire message.
    pub fn to_proto(&self) -> reapi::Digest {
        reapi::Digest { hash: self.hash_hex(), size_bytes: self.size as i64 }
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

impl fmt::Display for Digest {
    /// The Bazel form `hash/size`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.hash_hex(), self.size)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

impl FromStr for Digest {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Digest::parse(s)
    }
}

impl TryFrom<&reapi::Digest> for Digest {
    type Error = DigestError;
    fn try_from(d: &reapi::Digest) -> Result<Self, Self::Error> {
        Digest::from_parts(&d.hash, d.size_bytes)
    }
}

impl From<Digest> for reapi::Digest {
    fn from(d: Digest) -> Self {
        d.to_proto()
    }
}

/// Streaming SHA-256 that also counts bytes, producing a `Digest`.
#[derive(Clone, Default)]
pub struct Hasher {
    inner: Sha256,
    len: u64,
}

impl Hasher {
    /// A fresh hasher.
    pub fn new() -> Self {
        Hasher::default()
    }

    /// Feeds more bytes.
    pub fn update(&mut self, data: &[u8]) {
        self.inner.update(data);
        self.len += data.len() as u64;
    }

    /// Bytes fed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when nothing was fed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The digest of everything fed.
    pub fn finish(self) -> Digest {
        Digest { hash: self.inner.finalize().into(), size: self.len }
    }
}

/// Hashes a local file by reading it once in large chunks (blocking).
pub fn hash_file(path: &std::path::Path) -> std::io::Result<Digest> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HELLO: &str = "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03";

    #[test]
    fn empty_blob_constant_matches_sha256_of_nothing() {
        assert_eq!(Digest::of_bytes(b""), EMPTY);
        assert_eq!(EMPTY.hash_hex(), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    }

    #[test]
    fn both_text_forms_round_trip() {
        // sha256("hello\n"), as printed by sha256sum.
        let d = Digest::parse(&format!("{HELLO}/6")).unwrap();
        assert_eq!(d, Digest::of_bytes(b"hello\n"));
        assert_eq!(Digest::parse(&format!("{HELLO}-6")).unwrap(), d);
        assert_eq!(d.to_string(), format!("{HELLO}/6"));
        assert_eq!(d.to_path_form(), format!("{HELLO}-6"));
    }

    #[test]
    fn upper_case_hex_is_refused_by_name() {
        let upper = HELLO.to_uppercase();
        assert!(matches!(Digest::parse(&format!("{upper}/6")), Err(DigestError::UpperCase(_))));
        let mixed = format!("{}A{}", &HELLO[..10], &HELLO[11..]);
        let e = Digest::from_parts(&mixed, 6).unwrap_err();
        assert!(e.to_string().contains("lower-case"), "{e}");
        let wire = reapi::Digest { hash: upper, size_bytes: 6 };
        assert!(matches!(Digest::try_from(&wire), Err(DigestError::UpperCase(_))));
    }

    #[test]
    fn bad_input_gives_specific_errors() {
        assert!(matches!(Digest::parse("nohash"), Err(DigestError::Form(_))));
        assert!(matches!(Digest::parse("zz/1"), Err(DigestError::BadHex(_))));
        assert!(matches!(Digest::parse("abcd/1"), Err(DigestError::WrongLength { got: 4, .. })));
        assert!(matches!(Digest::parse(&format!("{HELLO}/-1")), Err(DigestError::NegativeSize(-1))));
        assert!(matches!(Digest::parse(&format!("{HELLO}/x")), Err(DigestError::BadSize(_))));
        assert!(matches!(Digest::parse(&format!("{HELLO}/99999999999999999999")), Err(DigestError::BadSize(_))));
        assert!(DigestFunction::from_proto(2).is_err());
        assert_eq!(DigestFunction::from_proto(0).unwrap(), DigestFunction::Sha256);
    }
}
