//! Error types, one per kind of failure, each printing as one line that names the shard.

use std::fmt;

use crate::ShardId;

/// Why a pool did not start. Every shard that had started is stopped and joined before this
/// is returned, so no thread is left behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartError {
    /// The placement asks for no shards or more than the mesh is sized for.
    ShardCount { count: usize, max: usize },
    /// The io_uring depth is zero or would lock too much memory.
    RingDepth { ring_depth: usize, max: usize },
    /// A mesh ring would have no slot, or an unreasonable number of them.
    MeshCapacity { capacity: usize, max: usize },
    /// A zero preemption timer would make every task yield at once.
    PreemptTimer,
    /// Nudging that often would keep idle shards busy.
    NudgeInterval {
        interval: std::time::Duration,
        min: std::time::Duration,
    },
    /// The prefix leaves no room for the shard index in a 15-byte Linux thread name.
    ThreadName { prefix: String, max: usize },
    /// Two shards would share a core, which defeats thread-per-core.
    DuplicateCore { core: usize },
    /// The core does not exist or the process may not run on it.
    CoreUnavailable {
        shard: ShardId,
        core: usize,
        allowed: Vec<usize>,
    },
    /// The OS refused to create the shard's thread.
    Thread { shard: ShardId, reason: String },
    /// glommio could not build the executor (memlock limit, io_uring setup, CPU binding).
    Executor { shard: ShardId, reason: String },
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartError::ShardCount { count, max } => {
                write!(f, "shard count {count} is outside 1..={max}")
            }
            StartError::RingDepth { ring_depth, max } => {
                write!(f, "ring depth {ring_depth} is outside 1..={max}")
            }
            StartError::MeshCapacity { capacity, max } => {
                write!(f, "mesh capacity {capacity} is outside 1..={max}")
            }
            StartError::PreemptTimer => write!(f, "preempt timer must be longer than zero"),
            StartError::NudgeInterval { interval, min } => {
                write!(f, "nudge interval {interval:?} is shorter than {min:?}")
            }
            StartError::ThreadName { prefix, max } => {
                write!(
                    f,
                    "thread name prefix {prefix:?} is longer than {max} bytes"
                )
            }
            StartError::DuplicateCore { core } => {
                write!(f, "core {core} is listed for more than one shard")
            }
            StartError::CoreUnavailable {
                shard,
                core,
                allowed,
            } => {
                write!(f, "{shard}: core {core} is not available (allowed cores: ")?;
                for (i, c) in allowed.iter().enumerate() {
                    let sep = if i == 0 { "" } else { "," };
                    write!(f, "{sep}{c}")?;
                }
                write!(f, ")")
            }
            StartError::Thread { shard, reason } => {
                write!(f, "{shard}: cannot spawn thread: {reason}")
            }
            StartError::Executor { shard, reason } => {
                write!(f, "{shard}: cannot start executor: {reason}")
            }
        }
    }
}

impl std::error::Error for StartError {}

/// A cross-shard send that could not be delivered because the destination has stopped.
///
/// `msg` gives the message back when the channel refused it up front; it is `None` when the
/// destination stopped while the send was waiting for room in a full ring (the message was
/// dropped with the wait).
pub struct SendError<M> {
    /// The shard that is gone.
    pub to: ShardId,
    /// The undelivered message, when it could be recovered.
    pub msg: Option<M>,
}

// Not derived: Debug must not dump payloads (or require M: Debug).
impl<M> fmt::Debug for SendError<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SendError")
            .field("to", &self.to)
            .field("msg_returned", &self.msg.is_some())
            .finish()
    }
}

impl<M> fmt::Display for SendError<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} has stopped; message not delivered", self.to)
    }
}

impl<M> std::error::Error for SendError<M> {}

/// A map-reduce that did not collect an answer from every shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueryError {
    /// The shard stopped (or died) before it answered.
    ShardStopped(ShardId),
    /// Only from [`crate::Control::map_reduce`]: the deadline passed first.
    Timeout { answered: usize, expected: usize },
}

impl fmt::Display for QueryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QueryError::ShardStopped(shard) => write!(f, "{shard} stopped before answering"),
            QueryError::Timeout { answered, expected } => {
                write!(f, "timed out with {answered} of {expected} answers")
            }
        }
    }
}

impl std::error::Error for QueryError {}

/// A shard that did not return a result because it panicked (in `main`, in a message
/// handler, or in any task of its executor).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinError {
    /// The shard whose thread panicked.
    pub shard: ShardId,
    /// The panic payload when it was a string.
    pub message: String,
}

impl fmt::Display for JoinError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} panicked: {}", self.shard, self.message)
    }
}

impl std::error::Error for JoinError {}

/// Turns a panic payload into the text `panic!` was given.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        String::from("non-string panic payload")
    }
}
