//! The crate's error type, with the one map to `tonic::Code` and the one map to errno.

use std::io;

use crate::digest::{Digest, DigestError};

/// Result alias used across casfs.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every failure casfs reports. Each variant carries the context needed to act on it (which
/// digest, which path); `code()` and `errno()` are the only translations to other worlds.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A digest in a request or on the command line is malformed.
    #[error("invalid digest: {0}")]
    Digest(#[from] DigestError),
    /// A request is malformed in some other way.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A blob is not in the store.
    #[error("blob {0} not found")]
    MissingBlob(Digest),
    /// Blobs an action needs are absent (REAPI: FAILED_PRECONDITION with a
    /// PreconditionFailure listing each as MISSING `blobs/{hash}/{size}`).
    #[error("missing blobs: {}", .0.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "))]
    MissingInputs(Vec<Digest>),
    /// Something other than a blob (an action result, an operation) is not there.
    #[error("{0} not found")]
    NotFound(String),
    /// Bytes did not hash to the digest they were stored or fetched under.
    #[error("digest mismatch: expected {expected}, bytes hash to {actual}")]
    DigestMismatch { expected: Box<Digest>, actual: Box<Digest> },
    /// A Directory (or Tree) message breaks the canonical-form rules.
    #[error("invalid Directory {digest}: {reason}")]
    InvalidDirectory { digest: String, reason: String },
    /// The request is well formed but the state of the world forbids it.
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// A remote server could not be reached or went away.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A deadline passed before the work completed.
    #[error("deadline exceeded: {0}")]
    DeadlineExceeded(String),
    /// A request exceeded a size or count limit.
    #[error("resource exhausted: {0}")]
    ResourceExhausted(String),
    /// The operation is not implemented here.
    #[error("unimplemented: {0}")]
    Unimplemented(String),
    /// A local I/O failure, with what we were doing.
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
    /// A status returned by a remote gRPC server, with what we asked it.
    #[error("{context}: {code:?}: {message}")]
    Remote { context: String, code: tonic::Code, message: String },
    /// A bug or an impossible state; never caused by input.
    #[error("internal error: {0}")]
    Internal(String),
    /// A directory operation on something that is not a directory (ENOTDIR).
    #[error("{0}: not a directory")]
    NotADirectory(String),
    /// A file operation on a directory (EISDIR).
    #[error("{0}: is a directory")]
    IsADirectory(String),
    /// readlink of something that is not a symbolic link (EINVAL).
    #[error("{0}: not a symbolic link")]
    NotASymlink(String),
    /// A file casfs made has no blob behind it (ENODATA): no digest, no backing file.
    #[error("{0}: made-up file without a blob")]
    NoBlob(String),
    /// A fetch that several readers shared failed; each gets this, with the digest.
    #[error("fetching {digest}: {source}")]
    Fetch { digest: Digest, source: std::sync::Arc<Error> },
}

impl Error {
    /// Wraps an I/O error with what we were doing.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io { context: context.into(), source }
    }

    /// Wraps a remote status with the request that produced it (and a hint when the
    /// cause is a mistake with a known fix, such as a CA certificate used as the server's).
    pub fn remote(context: impl Into<String>, status: tonic::Status) -> Self {
        let mut message = status.message().to_string();
        if let Some(hint) = hint_for(&status) {
            message.push_str(hint);
        }
        Error::Remote { context: context.into(), code: status.code(), message }
    }

    /// The gRPC code this error is reported with.
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            Error::Digest(_) | Error::InvalidArgument(_) | Error::DigestMismatch { .. } => Code::InvalidArgument,
            Error::InvalidDirectory { .. } => Code::InvalidArgument,
            Error::MissingBlob(_) | Error::NotFound(_) => Code::NotFound,
            Error::FailedPrecondition(_) | Error::MissingInputs(_) => Code::FailedPrecondition,
            Error::Unavailable(_) => Code::Unavailable,
            Error::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::Unimplemented(_) => Code::Unimplemented,
            Error::Io { source, .. } if source.kind() == io::ErrorKind::NotFound => Code::NotFound,
            Error::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => Code::ResourceExhausted,
            Error::Io { .. } | Error::Internal(_) => Code::Internal,
            Error::Remote { code, .. } => *code,
            Error::NotADirectory(_) | Error::IsADirectory(_) | Error::NotASymlink(_) | Error::NoBlob(_) => {
                Code::FailedPrecondition
            }
            Error::Fetch { source, .. } => source.code(),
        }
    }

    /// The errno a filesystem operation reports for this error.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            Error::NotFound(_) => libc::ENOENT,
            Error::Unimplemented(_) => libc::ENOSYS,
            Error::NotADirectory(_) => libc::ENOTDIR,
            Error::IsADirectory(_) => libc::EISDIR,
            Error::NotASymlink(_) => libc::EINVAL,
            Error::NoBlob(_) => libc::ENODATA,
            // Whatever went wrong while fetching (a local disk error included), the reader
            // sees an I/O error, or "no such name" when the name itself is absent.
            Error::Fetch { source, .. } if matches!(**source, Error::NotFound(_)) => libc::ENOENT,
            // A missing or corrupt blob below a visible name is an I/O error, not ENOENT:
            // the name exists, its content could not be produced.
            _ => libc::EIO,
        }
    }

    /// True when a write failed for want of space on the disk (ENOSPC, EDQUOT).
    pub fn is_disk_full(&self) -> bool {
        matches!(self, Error::Io { source, .. } if matches!(source.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)))
    }

    /// True when retrying the same request later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self.code(), tonic::Code::Unavailable | tonic::Code::ResourceExhausted)
    }

    /// The blob whose absence caused this error, looking through shared fetch failures.
    pub fn missing_blob(&self) -> Option<Digest> {
        match self {
            Error::MissingBlob(d) => Some(*d),
            Error::Fetch { source, .. } => source.missing_blob(),
            _ => None,
        }
    }
}

impl Error {
    /// The `google.rpc.Status` message for this error (with PreconditionFailure details for
    /// missing inputs), as ExecuteResponse.status and grpc-status-details-bin carry it.
    pub fn to_rpc_status(&self) -> crate::proto::rpc::Status {
        use prost::Message;
        let mut details = Vec::new();
        if let Error::MissingInputs(digests) = self {
            let pf = crate::proto::rpc::PreconditionFailure {
                violations: digests
                    .iter()
                    .map(|d| crate::proto::rpc::precondition_failure::Violation {
                        r#type: "MISSING".into(),
                        subject: format!("blobs/{}/{}", d.hash_hex(), d.size()),
                        description: String::new(),
                    })
                    .collect(),
            };
            details.push(prost_types::Any {
                type_url: "type.googleapis.com/google.rpc.PreconditionFailure".into(),
                value: pf.encode_to_vec(),
            });
        }
        crate::proto::rpc::Status { details, ..rpc_status(self.code(), self.to_string()) }
    }
}

/// A `google.rpc.Status` with `code` and `message` and no details: the one way casfs makes
/// one (errors make theirs with [`Error::to_rpc_status`]).
pub fn rpc_status(code: tonic::Code, message: impl Into<String>) -> crate::proto::rpc::Status {
    crate::proto::rpc::Status { code: code as i32, message: message.into(), details: vec![] }
}

/// The OK `google.rpc.Status`.
pub fn rpc_ok() -> crate::proto::rpc::Status {
    rpc_status(tonic::Code::Ok, "")
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        use prost::Message;
        match &e {
            Error::MissingInputs(_) => {
                let details = e.to_rpc_status().encode_to_vec();
                tonic::Status::with_details(e.code(), e.to_string(), details.into())
            }
            _ => tonic::Status::new(e.code(), e.to_string()),
        }
    }
}

impl From<prost::DecodeError> for Error {
    fn from(e: prost::DecodeError) -> Self {
        Error::InvalidArgument(format!("protobuf decode: {e}"))
    }
}

/// What to say about a failed call whose cause (anywhere in its source chain) has a known fix.
fn hint_for(status: &tonic::Status) -> Option<&'static str> {
    let mut texts = vec![status.message().to_string()];
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        texts.push(format!("{e} {e:?}"));
        source = e.source();
    }
    texts.iter().any(|t| t.contains("CaUsedAsEndEntity")).then_some(CA_AS_SERVER_HINT)
}

/// The fix for rustls' `CaUsedAsEndEntity` (a plain `openssl req -x509` certificate).
pub const CA_AS_SERVER_HINT: &str = "\nhint: the server presented a CA certificate (basicConstraints CA:TRUE, \
    as plain `openssl req -x509` makes) as its own; TLS accepts only a leaf certificate \
    (CA:FALSE) signed by the CA given with --tls-ca-file. A self-signed leaf, which is then \
    its own --tls-ca-file: openssl req -x509 -newkey rsa:2048 -nodes -days 365 \
    -keyout key.pem -out cert.pem -subj /CN=localhost -addext subjectAltName=DNS:localhost \
    -addext basicConstraints=critical,CA:FALSE (README: Security)";

/// Adds context to I/O results: `fs::read(p).ctx(|| format!("reading {p:?}"))`.
pub trait IoContext<T> {
    /// Converts an `io::Error` into `Error::Io` with the given context.
    fn ctx<F: FnOnce() -> String>(self, f: F) -> Result<T>;
}

impl<T> IoContext<T> for std::result::Result<T, io::Error> {
    fn ctx<F: FnOnce() -> String>(self, f: F) -> Result<T> {
        self.map_err(|e| Error::io(f(), e))
    }
}
