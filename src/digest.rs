//! Content digests: the `Digest` value type, digest functions, text forms and hashing.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

use crate::proto::reapi;

/// Length in bytes of a SHA-256 hash.
pub const SHA256_LEN: usize = 32;

/// Longest hash any supported function produces (SHA-512), in bytes.
pub const MAX_HASH_LEN: usize = 64;

/// A hash function the store can key blobs by. The enum is the single place to add more
/// (each needs a hash length, a name, a REAPI number and a hasher).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub enum DigestFunction {
    /// SHA-256, the function every REAPI server must support.
    #[default]
    Sha256,
    /// SHA-1 (legacy; 40 hex characters).
    Sha1,
    /// MD5 (legacy; 32 hex characters).
    Md5,
    /// SHA-384 (96 hex characters).
    Sha384,
    /// SHA-512 (128 hex characters).
    Sha512,
    /// BLAKE3 with 32-byte output; same length as SHA-256, so never inferred from length.
    Blake3,
}

impl DigestFunction {
    /// Every function this build supports, in order of preference.
    pub const ALL: [DigestFunction; 6] = [
        DigestFunction::Sha256,
        DigestFunction::Sha1,
        DigestFunction::Md5,
        DigestFunction::Sha384,
        DigestFunction::Sha512,
        DigestFunction::Blake3,
    ];

    /// The REAPI `DigestFunction.Value` number.
    pub fn proto_value(self) -> i32 {
        use reapi::digest_function::Value;
        (match self {
            DigestFunction::Sha256 => Value::Sha256,
            DigestFunction::Sha1 => Value::Sha1,
            DigestFunction::Md5 => Value::Md5,
            DigestFunction::Sha384 => Value::Sha384,
            DigestFunction::Sha512 => Value::Sha512,
            DigestFunction::Blake3 => Value::Blake3,
        }) as i32
    }

    /// The lower-case name used in resource names and browse paths (`sha256`).
    pub fn name(self) -> &'static str {
        match self {
            DigestFunction::Sha256 => "sha256",
            DigestFunction::Sha1 => "sha1",
            DigestFunction::Md5 => "md5",
            DigestFunction::Sha384 => "sha384",
            DigestFunction::Sha512 => "sha512",
            DigestFunction::Blake3 => "blake3",
        }
    }

    /// Length of the hash in bytes.
    pub fn hash_len(self) -> usize {
        match self {
            DigestFunction::Sha256 | DigestFunction::Blake3 => SHA256_LEN,
            DigestFunction::Sha1 => 20,
            DigestFunction::Md5 => 16,
            DigestFunction::Sha384 => 48,
            DigestFunction::Sha512 => 64,
        }
    }

    /// Length of the hash in hex characters.
    pub fn hex_len(self) -> usize {
        self.hash_len() * 2
    }

    /// Maps a request's `digest_function` field. `UNKNOWN` (0) maps to SHA-256 here; use
    /// [`DigestFunction::for_request`] where the spec says to infer from the hash length.
    pub fn from_proto(value: i32) -> Result<Self, DigestError> {
        if value == 0 {
            return Ok(DigestFunction::Sha256);
        }
        DigestFunction::ALL
            .into_iter()
            .find(|f| f.proto_value() == value)
            .ok_or(DigestError::UnsupportedFunction(value))
    }

    /// The function a request means: its `digest_function` field when set, otherwise the one
    /// the spec infers from the length of `hash_hex` (SHA-256, SHA-1, MD5, SHA-384, SHA-512;
    /// BLAKE3 is never inferred since it shares SHA-256's length). No hash: SHA-256.
    pub fn for_request(value: i32, hash_hex: Option<&str>) -> Result<Self, DigestError> {
        if value != 0 {
            return DigestFunction::from_proto(value);
        }
        Ok(hash_hex.and_then(|h| DigestFunction::from_hex_len(h.len())).unwrap_or_default())
    }

    /// The function whose hex hashes have `len` characters, among those the spec infers
    /// (BLAKE3 excluded).
    pub fn from_hex_len(len: usize) -> Option<Self> {
        DigestFunction::ALL.into_iter().find(|f| *f != DigestFunction::Blake3 && f.hex_len() == len)
    }

    /// Parses a lower-case function name as used in resource names.
    pub fn from_name(name: &str) -> Option<Self> {
        DigestFunction::ALL.into_iter().find(|f| f.name() == name)
    }

    /// The digest of the empty blob under this function.
    pub fn empty(self) -> Digest {
        Hasher::new_with(self).finish()
    }
}

impl fmt::Display for DigestFunction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DigestFunction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.to_ascii_lowercase();
        DigestFunction::from_name(&lower).ok_or_else(|| {
            let names: Vec<&str> = DigestFunction::ALL.iter().map(|f| f.name()).collect();
            format!("unknown digest function {s:?} (one of: {})", names.join(", "))
        })
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
    #[error("hash has {got} hex characters, {function} needs {want}")]
    WrongLength { got: usize, want: usize, function: DigestFunction },
    /// The size is not a number.
    #[error("size {0:?} is not a number")]
    BadSize(String),
    /// The size is below zero.
    #[error("size {0} is negative")]
    NegativeSize(i64),
    /// The size is beyond what any store holds (64 PiB).
    #[error("size {0} is over the largest blob size (2^56 - 1 bytes)")]
    TooLarge(u64),
    /// The request asked for a digest function we do not implement.
    #[error("digest function {0} is not supported (sha256, sha1, md5, sha384, sha512, blake3 are)")]
    UnsupportedFunction(i32),
}

/// A blob's identity: its hash, the function that made it, and its size in bytes. Always
/// valid once built. `Copy`: the hash lives in a fixed buffer sized for the longest function,
/// and the function shares a word with the size, so a digest is 72 bytes, not 80 (a mount
/// holds two per listed file: its Directory entry and its inode).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    hash: [u8; MAX_HASH_LEN],
    /// The size in the low [`SIZE_BITS`] bits, the function's index in [`DigestFunction::ALL`]
    /// above them.
    packed: u64,
}

/// Bits of [`Digest::packed`] that hold the size: blobs up to 64 PiB.
const SIZE_BITS: u32 = 56;
/// The largest size a digest can carry; a larger one on the wire is refused.
pub const MAX_SIZE: u64 = (1 << SIZE_BITS) - 1;

const fn pack(function: DigestFunction, size: u64) -> u64 {
    ((function as u64) << SIZE_BITS) | (size & MAX_SIZE)
}

/// The SHA-256 digest of the empty blob, which every store holds implicitly.
pub const EMPTY: Digest = Digest::sha256_const(
    [
        0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f, 0xb9, 0x24, 0x27, 0xae,
        0x41, 0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b, 0x78, 0x52, 0xb8, 0x55,
    ],
    0,
);

impl Digest {
    const fn sha256_const(hash: [u8; SHA256_LEN], size: u64) -> Self {
        let mut full = [0u8; MAX_HASH_LEN];
        let mut i = 0;
        while i < SHA256_LEN {
            full[i] = hash[i];
            i += 1;
        }
        Digest { hash: full, packed: pack(DigestFunction::Sha256, size) }
    }

    /// Builds a SHA-256 digest from raw hash bytes and a size.
    pub fn new(hash: [u8; SHA256_LEN], size: u64) -> Self {
        Digest::sha256_const(hash, size)
    }

    /// Builds a digest of `function` from raw hash bytes, which must have its length.
    pub fn new_with(function: DigestFunction, hash: &[u8], size: u64) -> Result<Self, DigestError> {
        if hash.len() != function.hash_len() {
            return Err(DigestError::WrongLength { got: hash.len() * 2, want: function.hex_len(), function });
        }
        if size > MAX_SIZE {
            return Err(DigestError::TooLarge(size));
        }
        let mut full = [0u8; MAX_HASH_LEN];
        full[..hash.len()].copy_from_slice(hash);
        Ok(Digest { hash: full, packed: pack(function, size) })
    }

    /// Hashes a whole buffer with SHA-256.
    pub fn of_bytes(data: &[u8]) -> Self {
        Digest::of_bytes_with(DigestFunction::Sha256, data)
    }

    /// Hashes a whole buffer with `function`.
    pub fn of_bytes_with(function: DigestFunction, data: &[u8]) -> Self {
        let mut h = Hasher::new_with(function);
        h.update(data);
        h.finish()
    }

    /// Hashes a protobuf message's canonical encoding (SHA-256); returns the digest and the bytes.
    pub fn of_message<M: prost::Message>(msg: &M) -> (Self, Vec<u8>) {
        Digest::of_message_with(DigestFunction::Sha256, msg)
    }

    /// Hashes a protobuf message's canonical encoding with `function`.
    pub fn of_message_with<M: prost::Message>(function: DigestFunction, msg: &M) -> (Self, Vec<u8>) {
        let bytes = msg.encode_to_vec();
        (Digest::of_bytes_with(function, &bytes), bytes)
    }

    /// Parses a lower-case hex hash and a size, taking the function from the hash length
    /// (64 characters: SHA-256, never BLAKE3). Upper-case hex is refused: the spec's form is
    /// lower case, and accepting both would give one blob two names.
    pub fn from_parts(hash_hex: &str, size: i64) -> Result<Self, DigestError> {
        let function = DigestFunction::from_hex_len(hash_hex.len()).unwrap_or_default();
        Digest::from_parts_with(function, hash_hex, size)
    }

    /// Parses a lower-case hex hash of `function` and a size, checking both.
    pub fn from_parts_with(function: DigestFunction, hash_hex: &str, size: i64) -> Result<Self, DigestError> {
        if size < 0 {
            return Err(DigestError::NegativeSize(size));
        }
        if size as u64 > MAX_SIZE {
            return Err(DigestError::TooLarge(size as u64));
        }
        let want = function.hex_len();
        if !hash_hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(DigestError::BadHex(truncate(hash_hex)));
        }
        if hash_hex.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(DigestError::UpperCase(truncate(hash_hex)));
        }
        if hash_hex.len() != want {
            return Err(DigestError::WrongLength { got: hash_hex.len(), want, function });
        }
        let mut hash = [0u8; MAX_HASH_LEN];
        hex::decode_to_slice(hash_hex, &mut hash[..function.hash_len()])
            .map_err(|_| DigestError::BadHex(truncate(hash_hex)))?;
        Ok(Digest { hash, packed: pack(function, size as u64) })
    }

    /// Parses `hash/size` (Bazel's form) or `hash-size` (path form), function from length.
    pub fn parse(text: &str) -> Result<Self, DigestError> {
        let (hash, size) = split_text(text)?;
        Digest::from_parts(hash, size)
    }

    /// Parses `hash/size` or `hash-size` as a digest of `function`.
    pub fn parse_with(function: DigestFunction, text: &str) -> Result<Self, DigestError> {
        let (hash, size) = split_text(text)?;
        Digest::from_parts_with(function, hash, size)
    }

    /// Reads a wire digest as one of `function`.
    pub fn from_proto_with(function: DigestFunction, d: &reapi::Digest) -> Result<Self, DigestError> {
        Digest::from_parts_with(function, &d.hash, d.size_bytes)
    }

    /// Reads a request's digest under the request's `digest_function` field (0: inferred
    /// from the hash length, as REAPI says).
    pub fn from_request(function: i32, d: &reapi::Digest) -> Result<Self, DigestError> {
        match function {
            0 => Digest::try_from(d),
            f => Digest::from_proto_with(DigestFunction::from_proto(f)?, d),
        }
    }

    /// The function that made this digest.
    pub fn function(&self) -> DigestFunction {
        DigestFunction::ALL[(self.packed >> SIZE_BITS) as usize]
    }

    /// The raw hash bytes (as many as the function produces).
    pub fn hash_bytes(&self) -> &[u8] {
        &self.hash[..self.function().hash_len()]
    }

    /// The hash as lower-case hex.
    pub fn hash_hex(&self) -> String {
        hex::encode(self.hash_bytes())
    }

    /// Size of the blob in bytes.
    pub fn size(&self) -> u64 {
        self.packed & MAX_SIZE
    }

    /// True for the digest of the empty blob, under any function.
    pub fn is_empty_blob(&self) -> bool {
        self.size() == 0 && (*self == EMPTY || *self == self.function().empty())
    }

    /// The path form `hash-size`, safe as a file name.
    pub fn to_path_form(&self) -> String {
        format!("{}-{}", self.hash_hex(), self.size())
    }

    /// The REAPI wire message.
    pub fn to_proto(&self) -> reapi::Digest {
        reapi::Digest { hash: self.hash_hex(), size_bytes: self.size() as i64 }
    }
}

fn split_text(text: &str) -> Result<(&str, i64), DigestError> {
    let text = text.trim();
    let (hash, size) =
        text.rsplit_once('/').or_else(|| text.rsplit_once('-')).ok_or_else(|| DigestError::Form(truncate(text)))?;
    match size.parse() {
        Ok(n) => Ok((hash, n)),
        Err(_) => Err(DigestError::BadSize(truncate(size))),
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

impl fmt::Display for Digest {
    /// The Bazel form `hash/size`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.hash_hex(), self.size())
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

/// One function's running state.
#[derive(Clone)]
enum State {
    Sha256(sha2::Sha256),
    Sha1(sha1::Sha1),
    Md5(md5::Md5),
    Sha384(sha2::Sha384),
    Sha512(sha2::Sha512),
    Blake3(Box<blake3::Hasher>),
}

/// Streaming hasher for one digest function that also counts bytes, producing a `Digest`.
#[derive(Clone)]
pub struct Hasher {
    inner: State,
    len: u64,
}

impl Default for Hasher {
    fn default() -> Self {
        Hasher::new()
    }
}

impl Hasher {
    /// A fresh SHA-256 hasher.
    pub fn new() -> Self {
        Hasher::new_with(DigestFunction::Sha256)
    }

    /// A fresh hasher for `function`.
    pub fn new_with(function: DigestFunction) -> Self {
        let inner = match function {
            DigestFunction::Sha256 => State::Sha256(Sha256::new()),
            DigestFunction::Sha1 => State::Sha1(sha1::Sha1::new()),
            DigestFunction::Md5 => State::Md5(md5::Md5::new()),
            DigestFunction::Sha384 => State::Sha384(sha2::Sha384::new()),
            DigestFunction::Sha512 => State::Sha512(sha2::Sha512::new()),
            DigestFunction::Blake3 => State::Blake3(Box::default()),
        };
        Hasher { inner, len: 0 }
    }

    /// The function this hasher computes.
    pub fn function(&self) -> DigestFunction {
        match self.inner {
            State::Sha256(_) => DigestFunction::Sha256,
            State::Sha1(_) => DigestFunction::Sha1,
            State::Md5(_) => DigestFunction::Md5,
            State::Sha384(_) => DigestFunction::Sha384,
            State::Sha512(_) => DigestFunction::Sha512,
            State::Blake3(_) => DigestFunction::Blake3,
        }
    }

    /// Feeds more bytes.
    pub fn update(&mut self, data: &[u8]) {
        match &mut self.inner {
            State::Sha256(h) => h.update(data),
            State::Sha1(h) => h.update(data),
            State::Md5(h) => h.update(data),
            State::Sha384(h) => h.update(data),
            State::Sha512(h) => h.update(data),
            State::Blake3(h) => {
                h.update(data);
            }
        }
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
        let function = self.function();
        let mut hash = [0u8; MAX_HASH_LEN];
        let n = function.hash_len();
        match self.inner {
            State::Sha256(h) => hash[..n].copy_from_slice(&h.finalize()),
            State::Sha1(h) => hash[..n].copy_from_slice(&h.finalize()),
            State::Md5(h) => hash[..n].copy_from_slice(&h.finalize()),
            State::Sha384(h) => hash[..n].copy_from_slice(&h.finalize()),
            State::Sha512(h) => hash[..n].copy_from_slice(&h.finalize()),
            State::Blake3(h) => hash[..n].copy_from_slice(h.finalize().as_bytes()),
        }
        Digest { hash, packed: pack(function, self.len) }
    }
}

/// Hashes a local file with SHA-256 by reading it once in large chunks (blocking).
pub fn hash_file(path: &std::path::Path) -> std::io::Result<Digest> {
    hash_file_with(DigestFunction::Sha256, path)
}

/// Hashes a local file with `function` (blocking).
pub fn hash_file_with(function: DigestFunction, path: &std::path::Path) -> std::io::Result<Digest> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = Hasher::new_with(function);
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
#[path = "digest_tests.rs"]
mod tests;
