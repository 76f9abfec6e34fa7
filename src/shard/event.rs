//! What shards tell each other. Every event is `Send`; messages travel as `Arc`s so a publish
//! fanned out to many shards is never copied.

use bytes::Bytes;
use std::os::fd::RawFd;
use std::sync::Arc;

use crate::protocol::{MqttStr, SubscriptionOptions};
use crate::session::SharedMessage;

/// A token that the shard waiting on a cross-shard round trip uses to find what it waits for.
pub type Token = u64;

/// One cross-shard event. Shards send each other `Vec<Event>` batches, one per tick.
#[derive(Debug)]
pub enum Event {
    /// Match this message against the receiving shard's subscriptions and deliver it. With
    /// `reply`, answer [`Event::Ack`] once what it wrote for persistent sessions is durable.
    Publish {
        msg: SharedMessage,
        reply: Option<Token>,
    },
    /// The routing index: `shard` has (`add`) or no longer has local subscribers whose
    /// matching filter is `filter`. With `reply`, the receiver answers [`Event::Ack`].
    Index {
        filter: Arc<str>,
        shard: u16,
        add: bool,
        reply: Option<Token>,
    },
    /// The answer to a round trip; `ok: false` when the answering shard could not store what
    /// was asked (the acknowledgement that waited on it must fail).
    Ack { token: Token, ok: bool },
    /// To the home shard of a retained topic: store or delete (empty payload) and replicate;
    /// with `reply`, answer once it is durable.
    RetainSet {
        msg: SharedMessage,
        reply: Option<Token>,
    },
    /// From the home shard of a retained topic to every other shard: the new value.
    RetainReplica(SharedMessage),
    /// An accepted connection whose client belongs to the receiving shard: its socket and
    /// the bytes read so far (the whole CONNECT and anything after it).
    Handoff { fd: RawFd, bytes: Bytes },
    /// To a shared group's home: `member` subscribes (or updates its subscription).
    SharedJoin {
        key: Arc<str>,
        member: SharedMember,
        reply: Token,
    },
    /// To a shared group's home: the member left the group.
    SharedLeave { key: Arc<str>, client_id: MqttStr },
    /// To a shared group's home: the member's client came online or went offline.
    SharedOnline {
        key: Arc<str>,
        client_id: MqttStr,
        online: bool,
    },
    /// From a group's home to the member's shard: deliver through the shared subscription.
    SharedDeliver {
        key: Arc<str>,
        client_id: MqttStr,
        msg: SharedMessage,
        attempts: u8,
    },
    /// At start, after a shard sent everything its recovery rebuilt (index entries, retained
    /// messages, group joins): nothing more of its recovery follows on this channel.
    RecoveryDone,
    /// At start, a session stored on a shard that no longer owns its client id (the shard
    /// count changed), with its whole queue. The owner stores it, then answers `reply` once
    /// durable; only then does the sender delete its copy.
    Rehome { session: Box<Rehomed>, reply: Token },
    /// Back to the group's home: the member could not take the message; pick another.
    SharedBounce {
        key: Arc<str>,
        msg: SharedMessage,
        not: MqttStr,
        attempts: u8,
    },
}

/// A session on its way to its new owner shard.
#[derive(Debug)]
pub struct Rehomed {
    pub stored: crate::storage::RecoveredSession,
    pub queue: Vec<(u64, crate::storage::QueuedRecord)>,
}

/// A member of a shared subscription group, as its home shard knows it.
#[derive(Clone, Debug)]
pub struct SharedMember {
    pub client_id: MqttStr,
    pub shard: u16,
    pub options: SubscriptionOptions,
    pub sub_id: Option<u32>,
    pub online: bool,
    /// Whether the member's session outlives its connection (it can queue while offline).
    pub persistent: bool,
}
