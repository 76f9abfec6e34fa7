//! The application message as it travels between shards and sessions: decoded once from
//! the publisher's PUBLISH, shared by reference by every receiver.

use bytes::Bytes;
use std::sync::Arc;
use std::time::Instant;

use shardmq_protocol::{MqttStr, PublishProperties, QoS, TopicName};

/// One published message. Immutable once built; receivers adapt QoS, packet id, retain flag,
/// topic alias, subscription identifiers and the remaining expiry when they encode it.
#[derive(Clone, PartialEq, Eq)]
pub struct Message {
    pub topic: TopicName,
    pub payload: Bytes,
    pub qos: QoS,
    /// The RETAIN flag as published.
    pub retain: bool,
    /// Forwarded unchanged, except that the topic alias and subscription identifiers are
    /// removed here (they belong to one hop) and the expiry is counted from `created`.
    pub properties: PublishProperties,
    /// The publisher's client id, for No Local; `None` for messages the broker makes.
    pub origin: Option<MqttStr>,
    /// A client's QoS 2 PUBLISH as routed from its shard: with `origin`, the key by which a
    /// persistent session recognises a resend of a message it has stored already. `None`
    /// for everything else (and on copies kept for later: retained, read back from disk).
    /// Never encoded on the wire.
    pub qos2_id: Option<Qos2Id>,
    /// When the broker received it; with the Message Expiry Interval gives the deadline.
    pub created: Instant,
    /// In a cluster, the shared subscription groups (`$share/<group>/<filter>` keys) this
    /// node delivers it to: each group gets a message once in the whole cluster, on the one
    /// node the publisher's shard picked for it. `None`: every group here (a broker that
    /// runs alone, or no group anywhere matched). Never stored, never on the MQTT wire.
    pub groups: Option<GroupPick>,
}

/// The shared groups a node serves for one message (see [`Message::groups`]).
pub type GroupPick = Arc<[Arc<str>]>;

/// The publisher's packet id of a QoS 2 message, and whether its PUBLISH had DUP set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Qos2Id {
    pub packet_id: u16,
    /// DUP = 1: it may be a resend of a message already stored (MQTT-3.3.1-1). A PUBLISH
    /// with DUP = 0 is a new message even if a stale key of an earlier one with the same
    /// packet id is left after a crash.
    pub dup: bool,
}

/// Messages are shared, not copied, between receivers and shards.
pub type SharedMessage = Arc<Message>;

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Message")
            .field("topic", &self.topic)
            .field("qos", &self.qos)
            .field("retain", &self.retain)
            .field("payload_len", &self.payload.len())
            .field("origin", &self.origin)
            .field("qos2_id", &self.qos2_id)
            .field("groups", &self.groups)
            .finish()
    }
}

impl Message {
    /// A retained message the broker makes itself (no publisher, QoS 0, no properties): a
    /// `$SYS` topic's value, or, empty, a deletion.
    pub fn by_broker_retained(topic: TopicName, payload: Bytes, now: Instant) -> Message {
        Message {
            topic,
            payload,
            qos: QoS::AtMostOnce,
            retain: true,
            properties: PublishProperties::default(),
            origin: None,
            qos2_id: None,
            created: now,
            groups: None,
        }
    }

    /// The Message Expiry Interval left at `now`: `None` when the message does not expire,
    /// `Some(0)`... never: an expired message gives `Err(())`.
    pub fn remaining_expiry(&self, now: Instant) -> Result<Option<u32>, Expired> {
        let Some(interval) = self.properties.message_expiry_interval else {
            return Ok(None);
        };
        let elapsed = now.saturating_duration_since(self.created).as_secs();
        if elapsed >= interval as u64 {
            return Err(Expired);
        }
        Ok(Some(interval - elapsed as u32))
    }

    /// Whether the shared group `key` gets this message here (see [`Message::groups`]).
    pub fn serves_group(&self, key: &str) -> bool {
        self.groups
            .as_ref()
            .is_none_or(|g| g.iter().any(|k| &**k == key))
    }

    /// Bytes this message costs a queue (payload and topic; the rest is small and shared).
    pub fn cost_bytes(&self) -> u64 {
        (self.payload.len() + self.topic.len()) as u64
    }
}

/// A message whose Message Expiry Interval has passed: it must not be delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expired;
