//! The one error type of the crate.
//!
//! Every failure, from a short read to a hostile header, becomes an [`Error`]:
//! a small stable kind, a message that names what was wrong (QEMU's exact text
//! where we reproduce it), and an errno for the C ABI. Nothing here performs
//! I/O or knows about images.

use std::io;

/// Result alias used throughout the crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong in oxqcow.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The host file failed; `context` says which file and what we were doing.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// The image is not valid qcow2 (or breaks one of QEMU's limits).
    #[error("{0}")]
    Invalid(String),
    /// The image uses a feature oxqcow does not implement.
    #[error("{0}")]
    Unsupported(String),
    /// Metadata damage was found; the image may have been marked corrupt.
    #[error("{0}")]
    Corrupt(String),
    /// A caller passed a bad argument or option.
    #[error("{0}")]
    InvalidArgument(String),
    /// A request reaches past the end of the image.
    #[error("{0}")]
    OutOfRange(String),
    /// The image is opened read-only, or is marked corrupt.
    #[error("{0}")]
    ReadOnly(String),
    /// The image would exceed a format limit.
    #[error("{0}")]
    TooLarge(String),
    /// No space left on the host (or the header cluster is full).
    #[error("{0}")]
    NoSpace(String),
    /// An encrypted image's password is wrong or missing.
    #[error("{0}")]
    Key(String),
}

impl Error {
    /// The positive errno value the C ABI negates.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            Error::Invalid(_) => libc::EINVAL,
            Error::Unsupported(_) => libc::ENOTSUP,
            Error::Corrupt(_) => libc::EIO,
            Error::InvalidArgument(_) => libc::EINVAL,
            Error::OutOfRange(_) => libc::EINVAL,
            Error::ReadOnly(_) => libc::EACCES,
            Error::TooLarge(_) => libc::EFBIG,
            Error::NoSpace(_) => libc::ENOSPC,
            Error::Key(_) => libc::EACCES,
        }
    }

    /// Wraps an I/O error with a description of the failed operation.
    pub fn io(context: impl Into<String>, source: io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// Prefixes the message with more context (usually the file name).
    pub fn context(self, what: &str) -> Error {
        match self {
            Error::Io { context, source } => Error::Io {
                context: format!("{what}: {context}"),
                source,
            },
            Error::Invalid(m) => Error::Invalid(format!("{what}: {m}")),
            Error::Unsupported(m) => Error::Unsupported(format!("{what}: {m}")),
            Error::Corrupt(m) => Error::Corrupt(format!("{what}: {m}")),
            Error::InvalidArgument(m) => Error::InvalidArgument(format!("{what}: {m}")),
            Error::OutOfRange(m) => Error::OutOfRange(format!("{what}: {m}")),
            Error::ReadOnly(m) => Error::ReadOnly(format!("{what}: {m}")),
            Error::TooLarge(m) => Error::TooLarge(format!("{what}: {m}")),
            Error::NoSpace(m) => Error::NoSpace(format!("{what}: {m}")),
            Error::Key(m) => Error::Key(format!("{what}: {m}")),
        }
    }
}

/// Shorthand for an [`Error::Invalid`] with a formatted message.
macro_rules! invalid {
    ($($arg:tt)*) => { $crate::error::Error::Invalid(format!($($arg)*)) };
}
pub(crate) use invalid;
