//! What shards tell each other. Every event is `Send`; messages travel as `Arc`s so a publish
//! fanned out to many shards is never copied.

use bytes::Bytes;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use crate::protocol::{MqttStr, SubscriptionOptions};
use crate::session::SharedMessage;

/// A token that the shard waiting on a cross-shard round trip uses to find what it waits for.
pub type Token = u64;

/// What travels between shards: batches of events for the core, and connections for the
/// network layer (which the core never sees).
#[derive(Debug)]
pub enum Mail {
    Events(Vec<Event>),
    Handoff(Box<Handoff>),
}

impl From<Vec<Event>> for Mail {
    fn from(events: Vec<Event>) -> Mail {
        Mail::Events(events)
    }
}

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
    /// was asked (the acknowledgement that waited on it must fail). `fate` says what the
    /// answering shard's sessions did with a routed message (default for other round trips).
    Ack { token: Token, ok: bool, fate: Fate },
    /// A retained message (or, with an empty payload, its deletion), sent by the publisher's
    /// shard to every other shard ahead of the message itself, so that a shard has the
    /// retained copy before any of its subscribers sees the live one. `version` orders
    /// concurrent writes to one topic the same way on every shard (last writer wins); the
    /// topic's home shard stores the winner. With `reply`, answer once applied (and, at the
    /// home, durable): a retained publish is acknowledged only when every shard has it.
    RetainReplica {
        msg: SharedMessage,
        version: RetainVersion,
        reply: Option<Token>,
    },
    /// To a shared group's home: `member` subscribes (or updates its subscription).
    SharedJoin {
        key: Arc<str>,
        member: SharedMember,
        reply: Token,
    },
    /// To a shared group's home: the member left the group.
    SharedLeave { key: Arc<str>, client_id: MqttStr },
    /// From a shared group's home, in a cluster node: the group has (`add`) or no longer
    /// has members on this node (the publisher's shard picks the node a group gets a
    /// message on, this one included).
    GroupHere { key: Arc<str>, add: bool },
    /// To a shared group's home: the member's client came online or went offline.
    SharedOnline {
        key: Arc<str>,
        client_id: MqttStr,
        online: bool,
    },
    /// From a group's home to the member's shard: deliver through the shared subscription.
    /// A member that cannot take it (gone, may not read it, its queue full) sends it back
    /// to the home ([`Event::SharedBounce`]), at most three times.
    SharedDeliver {
        key: Arc<str>,
        client_id: MqttStr,
        msg: SharedMessage,
        attempts: u8,
        /// Answer `Ack` to (shard, token) once the copy is durable: the publisher's PUBACK
        /// waits for the member that took the message, not only for the group's home.
        reply: Option<(usize, Token)>,
        /// What members tried before did with it (a full queue): part of the answer.
        fate: Fate,
    },
    /// At start, after a shard sent everything its recovery rebuilt (index entries, retained
    /// messages, group joins): nothing more of its recovery follows on this channel.
    RecoveryDone,
    /// At start, a session stored on a shard that no longer owns its client id (the shard
    /// count changed), with its whole queue. The owner stores it, then answers `reply` once
    /// durable; only then does the sender delete its copy.
    Rehome { session: Box<Rehomed>, reply: Token },
    /// From the shard of the publisher `origin`: forget the QoS 2 dedup key (`origin`,
    /// `packet_id`) in every session holding it (`packet_id: None`: every key of `origin`,
    /// when its session ended). Sent when the publisher releases the message (PUBREL), before
    /// its packet id may be reused. With `reply`, answer [`Event::Ack`] once the deletions
    /// are durable.
    Qos2Release {
        origin: MqttStr,
        packet_id: Option<u16>,
        reply: Option<Token>,
    },
    /// Back to the group's home: the member could not take the message; pick another.
    SharedBounce {
        key: Arc<str>,
        msg: SharedMessage,
        not: MqttStr,
        attempts: u8,
        /// Passed on to the next member (see [`Event::SharedDeliver`]).
        reply: Option<(usize, Token)>,
        /// What the members tried so far did with it.
        fate: Fate,
    },
}

/// What the sessions that a routed message reached did with it: one shard's answer to a
/// publish's round trip, merged over every shard that answered. The publisher's
/// acknowledgement is built from it: a message that no session took because queues were
/// full is not acknowledged as a success (MQTT 5: 0x97), and one refused for the
/// broker-wide storage budget is treated like a failed write.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fate {
    /// Some session took it: sent, queued, or already held (a QoS 2 resend).
    pub kept: bool,
    /// Some session refused it (or pushed out an older message) because its queue was at
    /// `limits.queue_messages_max` or `limits.queue_bytes_max`.
    pub queue_full: bool,
    /// Some persistent session refused it because the broker-wide budget for queued data
    /// (`storage.queued_bytes_max`) was spent.
    pub budget_spent: bool,
    /// Some session that would store it is moving to another cluster node: not stored
    /// here, and its new node may not have had it routed yet (a failure: the publisher
    /// sends it again).
    pub moving: bool,
}

impl Event {
    /// The answer to a round trip that succeeded and asked nothing about a message's fate.
    pub fn done(token: Token) -> Event {
        Event::Ack {
            token,
            ok: true,
            fate: Fate::default(),
        }
    }
}

impl Fate {
    pub fn merge(&mut self, o: Fate) {
        self.kept |= o.kept;
        self.queue_full |= o.queue_full;
        self.budget_spent |= o.budget_spent;
        self.moving |= o.moving;
    }
}

/// A connection on its way from the shard that accepted it to the shard that owns its client.
#[derive(Debug)]
pub struct Handoff {
    /// The socket, now the receiver's: the client's own TCP socket, or (TLS, WebSocket) the
    /// broker's end of a socket pair that the accepting shard relays the decrypted or
    /// unframed bytes through. Closed when the hand-off is dropped undelivered.
    pub fd: OwnedFd,
    pub socket: HandoffSocket,
    /// Every byte read so far: the whole CONNECT and anything after it.
    pub bytes: Bytes,
    /// The client's address (for logs; a relayed connection's socket pair has none).
    pub peer: Option<std::net::SocketAddr>,
    /// The subject of the client's verified TLS certificate, when its listener uses it as
    /// the username.
    pub cert_identity: Option<String>,
    /// Held while the connection lives (a listener's count of open connections).
    pub guard: Option<ConnGuard>,
}

/// What kind of socket a [`Handoff`] carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandoffSocket {
    Tcp,
    Unix,
}

/// Something a connection holds until it ends; dropping it releases what it counts.
pub type ConnGuard = Box<dyn std::fmt::Debug + Send>;

/// The order of writes to one retained topic: the publisher shard's clock (made strictly
/// increasing per shard), then the shard id to break ties.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RetainVersion {
    pub at_ns: u64,
    pub shard: u16,
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
    /// The member's identity for read access (see `Session::identity`); `None`: unknown
    /// (read back from disk), the member's shard checks at delivery.
    pub identity: Option<Option<MqttStr>>,
}
