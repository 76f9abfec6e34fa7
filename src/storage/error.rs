//! The storage module's errors. Every variant says which store (directory) and what operation,
//! so that a log line is enough to act on it.

use std::fmt;
use std::path::PathBuf;

/// Why a storage operation failed.
#[derive(Debug)]
pub enum StorageError {
    /// The directory exists and holds something that is not a shardmq store (no marker file,
    /// but other files), or it is not a directory at all. Nothing was written to it.
    NotAStore { path: PathBuf, reason: String },
    /// The directory is a shardmq store of a format this build does not read.
    UnsupportedFormat { path: PathBuf, found: String },
    /// The engine's journal fails its checksum in a complete entry (not a torn tail, which
    /// the engine truncates itself), and the engine refuses to open the store at all.
    JournalDamaged { path: PathBuf, detail: String },
    /// Another `Store` (in this process or another one) has the directory open.
    Locked { path: PathBuf },
    /// A file system operation of the storage module itself (marker file, directory).
    Io {
        path: PathBuf,
        op: &'static str,
        source: std::io::Error,
    },
    /// The storage engine failed. After a failed write or fsync the engine refuses every
    /// further write ([`StorageError::is_poisoned`]): the store must be reopened.
    Engine {
        op: &'static str,
        source: fjall::Error,
    },
    /// The engine is being reopened after a failure (see `Store::try_recover`).
    Unavailable { path: PathBuf },
    /// A key would exceed the engine's 65,535-byte limit (client id plus topic filter).
    KeyTooLong { what: &'static str, len: usize },
    /// A record could not be serialized.
    Encode(String),
}

impl StorageError {
    pub(crate) fn engine(op: &'static str) -> impl FnOnce(fjall::Error) -> StorageError {
        move |source| StorageError::Engine { op, source }
    }

    /// Whether the engine refuses all further writes after an earlier I/O failure (full
    /// disk, failed fsync). Reopening the store is the only way out.
    pub fn is_poisoned(&self) -> bool {
        matches!(
            self,
            StorageError::Engine {
                source: fjall::Error::Poisoned,
                ..
            }
        )
    }

    /// Whether the error says the store cannot write (engine or file system failure, or
    /// the engine being reopened), as opposed to a bad key or record.
    pub fn is_io_failure(&self) -> bool {
        matches!(
            self,
            StorageError::Io { .. }
                | StorageError::Engine { .. }
                | StorageError::Unavailable { .. }
        )
    }

    /// The underlying I/O error, when there is one (e.g. to tell a full disk apart).
    pub fn io_error(&self) -> Option<&std::io::Error> {
        match self {
            StorageError::Io { source, .. } => Some(source),
            StorageError::Engine {
                source: fjall::Error::Io(e),
                ..
            }
            | StorageError::Engine {
                source: fjall::Error::Storage(fjall::LsmError::Io(e)),
                ..
            } => Some(e),
            _ => None,
        }
    }
}

impl fmt::Display for StorageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StorageError::NotAStore { path, reason } => {
                write!(f, "{} is not a shardmq store: {reason}", path.display())
            }
            StorageError::UnsupportedFormat { path, found } => write!(
                f,
                "{} holds a shardmq store in format {found:?}, which this build cannot read",
                path.display()
            ),
            StorageError::JournalDamaged { path, detail } => write!(
                f,
                "the journal of the store at {} is damaged ({detail}) and the storage engine \
                 refuses to open it; moving the *.jnl files out of the directory opens the \
                 store with what its table files hold, losing the writes not yet flushed to them",
                path.display()
            ),
            StorageError::Locked { path } => write!(
                f,
                "the store at {} is already open (another shardmq process, or another shard \
                 configured with the same data directory)",
                path.display()
            ),
            StorageError::Io { path, op, source } => {
                write!(f, "{op} {}: {source}", path.display())
            }
            StorageError::Engine { op, source } => {
                write!(f, "storage engine failed to {op}: {source}")?;
                if matches!(source, fjall::Error::Poisoned) {
                    write!(f, " (an earlier write or fsync failed; reopen the store)")?;
                }
                Ok(())
            }
            StorageError::Unavailable { path } => write!(
                f,
                "the store at {} is being reopened after a storage failure",
                path.display()
            ),
            StorageError::KeyTooLong { what, len } => {
                write!(f, "{what} key of {len} bytes exceeds the 65535-byte limit")
            }
            StorageError::Encode(msg) => write!(f, "cannot serialize record: {msg}"),
        }
    }
}

impl std::error::Error for StorageError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StorageError::Io { source, .. } => Some(source),
            StorageError::Engine { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// A stored record that cannot be turned back into the runtime type (an invalid topic, an
/// out-of-range QoS...). Only possible with records written by a buggy or foreign writer,
/// since the checksum guards against damage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordError(pub String);

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid stored record: {}", self.0)
    }
}

impl std::error::Error for RecordError {}
