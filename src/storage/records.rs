//! The stored records: plain structs archived with rkyv, each stored value framed as
//!
//! ```text
//! [magic "SQ"][kind: u8][format: u8][crc32 of the rkyv bytes: u32 LE][rkyv bytes]
//! ```
//!
//! The kind byte names the record type (so a value under the wrong keyspace is caught), the
//! format byte its layout version. rkyv's validation is no integrity check (it accepts most
//! single-byte corruptions), hence the CRC. The rkyv format is fixed by the crate features
//! (`unaligned`, little endian, 32-bit offsets): changing those features changes the stored
//! format, which would need a new format byte.
//!
//! Conversions to and from the runtime types live here too. `Instant`s are stored as wall
//! clock unix milliseconds, converted through a [`WallClock`] read once per batch.

use bytes::{Bytes, BytesMut};
use rkyv::rancor::BoxedError;
use rkyv::{Archive, Deserialize, Serialize};
use std::num::NonZeroU16;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::error::{RecordError, StorageError};
use crate::protocol::wire::Reader;
use crate::protocol::{
    MqttStr, ProtocolVersion, PublishProperties, QoS, RetainHandling, SubscriptionOptions,
    TopicFilter, TopicName,
};
use crate::session::state::{Inflight, OutState, SessionStats};
use crate::session::{Delivery, Message, Subscription, Will};

/// Bytes before the rkyv body.
pub(crate) const HEADER_LEN: usize = 8;
const MAGIC: [u8; 2] = *b"SQ";
/// Layout version of every record kind but sessions; bump on any change of a record struct.
pub(crate) const FORMAT: u8 = 1;
/// Layout version of [`SessionRecord`]: 2 added the owner. Format 1 records are still read
/// (their owner is unknown, as a session from before owners were stored).
pub(crate) const SESSION_FORMAT: u8 = 2;

fn format_of(kind: Kind) -> u8 {
    match kind {
        Kind::Session => SESSION_FORMAT,
        _ => FORMAT,
    }
}

/// Record kinds (the third byte of every stored value).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Kind {
    Session = b's',
    Subscription = b'u',
    Queued = b'q',
    Inflight = b'i',
    Incoming = b'n',
    Retained = b'r',
    Dedup = b'd',
    Counters = b'c',
}

/// Frames an rkyv body: header plus body.
fn frame(kind: Kind, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER_LEN + body.len());
    v.extend_from_slice(&MAGIC);
    v.push(kind as u8);
    v.push(format_of(kind));
    v.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    v.extend_from_slice(body);
    v
}

/// Checks the header and checksum and returns the rkyv body, or why the value is damaged.
pub(crate) fn unframe(kind: Kind, value: &[u8]) -> Result<&[u8], String> {
    match unframe_any(kind, value)? {
        (f, body) if f == format_of(kind) => Ok(body),
        (f, _) => Err(format!("unknown record format {f}")),
    }
}

/// [`unframe`] for a kind read in more than one format: the format and the body.
fn unframe_any(kind: Kind, value: &[u8]) -> Result<(u8, &[u8]), String> {
    if value.len() < HEADER_LEN {
        return Err(format!(
            "value of {} bytes is shorter than the header",
            value.len()
        ));
    }
    if value[..2] != MAGIC {
        return Err(format!("bad magic {:02x}{:02x}", value[0], value[1]));
    }
    if value[2] != kind as u8 {
        return Err(format!(
            "record kind {:?} where {:?} ({:?}) was expected",
            value[2] as char, kind as u8 as char, kind
        ));
    }
    if value[3] == 0 || value[3] > format_of(kind) {
        return Err(format!("unknown record format {}", value[3]));
    }
    let stored = u32::from_le_bytes([value[4], value[5], value[6], value[7]]);
    let body = &value[HEADER_LEN..];
    let actual = crc32fast::hash(body);
    if stored != actual {
        return Err(format!(
            "checksum mismatch (stored {stored:08x}, computed {actual:08x})"
        ));
    }
    Ok((value[3], body))
}

/// The framed value of an incoming QoS 2 packet id (no body).
pub(crate) fn incoming_value() -> Vec<u8> {
    frame(Kind::Incoming, &[])
}

/// The framed value of a QoS 2 dedup key (no body).
pub(crate) fn dedup_value() -> Vec<u8> {
    frame(Kind::Dedup, &[])
}

/// A record type stored in one keyspace.
pub(crate) trait Record: Sized {
    const KIND: Kind;
    /// The framed value.
    fn to_value(&self) -> Result<Vec<u8>, StorageError>;
    /// Verifies and decodes a framed value; the error says why it is damaged.
    fn from_value(value: &[u8]) -> Result<Self, String>;
}

macro_rules! record {
    ($t:ty, $kind:expr) => {
        impl Record for $t {
            const KIND: Kind = $kind;
            fn to_value(&self) -> Result<Vec<u8>, StorageError> {
                let body = rkyv::to_bytes::<BoxedError>(self)
                    .map_err(|e| StorageError::Encode(e.to_string()))?;
                Ok(frame(Self::KIND, &body))
            }
            fn from_value(value: &[u8]) -> Result<Self, String> {
                let body = unframe(Self::KIND, value)?;
                rkyv::from_bytes::<$t, BoxedError>(body)
                    .map_err(|e| format!("undecodable record: {e}"))
            }
        }
    };
}

impl Record for SessionRecord {
    const KIND: Kind = Kind::Session;
    fn to_value(&self) -> Result<Vec<u8>, StorageError> {
        let body =
            rkyv::to_bytes::<BoxedError>(self).map_err(|e| StorageError::Encode(e.to_string()))?;
        Ok(frame(Self::KIND, &body))
    }
    fn from_value(value: &[u8]) -> Result<Self, String> {
        let undecodable = |e: BoxedError| format!("undecodable record: {e}");
        match unframe_any(Self::KIND, value)? {
            (1, body) => rkyv::from_bytes::<SessionRecordV1, BoxedError>(body)
                .map(SessionRecord::from)
                .map_err(undecodable),
            (_, body) => rkyv::from_bytes::<SessionRecord, BoxedError>(body).map_err(undecodable),
        }
    }
}
record!(SubscriptionRecord, Kind::Subscription);
record!(QueuedRecord, Kind::Queued);
record!(InflightRecord, Kind::Inflight);
record!(MessageRecord, Kind::Retained);
record!(CountersRecord, Kind::Counters);

/// A session's drop counters (what [`crate::session::state::SessionStats`] counts of the
/// messages it did not take), kept with the session so that they survive restarts. Stored
/// in the same batch as the queue change that moved them.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CountersRecord {
    pub dropped_queue_full: u64,
    pub dropped_storage_budget: u64,
    pub dropped_qos0_slow: u64,
    pub dropped_expired: u64,
    pub dropped_too_large: u64,
    pub dropped_qos0_offline: u64,
}

impl CountersRecord {
    pub fn from_stats(s: &SessionStats) -> CountersRecord {
        CountersRecord {
            dropped_queue_full: s.dropped_queue_full,
            dropped_storage_budget: s.dropped_storage_budget,
            dropped_qos0_slow: s.dropped_qos0_slow,
            dropped_expired: s.dropped_expired,
            dropped_too_large: s.dropped_too_large,
            dropped_qos0_offline: s.dropped_qos0_offline,
        }
    }

    /// Puts the stored counts into a session's counters (which count on from there).
    pub fn restore_into(&self, s: &mut SessionStats) {
        s.dropped_queue_full = self.dropped_queue_full;
        s.dropped_storage_budget = self.dropped_storage_budget;
        s.dropped_qos0_slow = self.dropped_qos0_slow;
        s.dropped_expired = self.dropped_expired;
        s.dropped_too_large = self.dropped_too_large;
        s.dropped_qos0_offline = self.dropped_qos0_offline;
    }
}

/// What a queued value costs the session's byte limit (payload plus topic, as
/// [`Message::cost_bytes`]), read without deserializing; `Err` when damaged.
pub(crate) fn queued_cost(value: &[u8]) -> Result<u64, String> {
    let body = unframe(Kind::Queued, value)?;
    let rec = rkyv::access::<ArchivedQueuedRecord, BoxedError>(body)
        .map_err(|e| format!("undecodable record: {e}"))?;
    Ok((rec.message.payload.len() + rec.message.topic.len()) as u64)
}

/// A wall-clock reading paired with the monotonic clock, to convert between stored unix
/// milliseconds and the `Instant`s of the runtime types. Read it once and use it for a
/// whole batch.
#[derive(Copy, Clone, Debug)]
pub struct WallClock {
    pub instant: Instant,
    pub unix_ms: u64,
}

impl WallClock {
    pub fn now() -> WallClock {
        WallClock {
            instant: Instant::now(),
            unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        }
    }

    /// The unix time of `t`.
    pub fn unix_ms_of(&self, t: Instant) -> u64 {
        if t <= self.instant {
            let ago = self.instant.duration_since(t).as_millis() as u64;
            self.unix_ms.saturating_sub(ago)
        } else {
            let ahead = t.duration_since(self.instant).as_millis() as u64;
            self.unix_ms.saturating_add(ahead)
        }
    }

    /// The `Instant` of a past unix time. A time in the future (the wall clock went back)
    /// gives now.
    pub fn instant_of(&self, unix_ms: u64) -> Instant {
        let ago = Duration::from_millis(self.unix_ms.saturating_sub(unix_ms));
        self.instant.checked_sub(ago).unwrap_or(self.instant)
    }
}

/// An application message.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct MessageRecord {
    pub topic: String,
    pub payload: Vec<u8>,
    /// The QoS as published.
    pub qos: u8,
    /// The RETAIN flag as published.
    pub retain: bool,
    /// The MQTT 5 PUBLISH property block as our codec encodes it (length prefix included),
    /// without topic alias and subscription identifiers; empty when there are none.
    pub properties: Vec<u8>,
    pub origin: Option<String>,
    pub created_unix_ms: u64,
}

impl MessageRecord {
    pub fn from_message(msg: &Message, clock: &WallClock) -> MessageRecord {
        let properties = if msg.properties.is_empty() {
            Vec::new()
        } else if msg.properties.topic_alias.is_none()
            && msg.properties.subscription_identifiers.is_empty()
        {
            encode_properties(&msg.properties)
        } else {
            let mut p = msg.properties.clone();
            p.topic_alias = None;
            p.subscription_identifiers.clear();
            encode_properties(&p)
        };
        MessageRecord {
            topic: msg.topic.as_str().to_owned(),
            payload: msg.payload.to_vec(),
            qos: msg.qos.as_u8(),
            retain: msg.retain,
            properties,
            origin: msg.origin.as_ref().map(|o| o.as_str().to_owned()),
            created_unix_ms: clock.unix_ms_of(msg.created),
        }
    }

    pub fn to_message(&self, clock: &WallClock) -> Result<Message, RecordError> {
        let topic = TopicName::new(&self.topic)
            .map_err(|e| RecordError(format!("topic {:?}: {e}", self.topic)))?;
        let properties = if self.properties.is_empty() {
            PublishProperties::default()
        } else {
            let mut r = Reader::new(Bytes::copy_from_slice(&self.properties));
            PublishProperties::decode(&mut r)
                .map_err(|e| RecordError(format!("publish properties: {e}")))?
        };
        let origin = match &self.origin {
            None => None,
            Some(o) => {
                Some(MqttStr::new(o).map_err(|e| RecordError(format!("origin {o:?}: {e}")))?)
            }
        };
        Ok(Message {
            topic,
            payload: Bytes::copy_from_slice(&self.payload),
            qos: qos(self.qos)?,
            retain: self.retain,
            properties,
            origin,
            qos2_id: None,
            created: clock.instant_of(self.created_unix_ms),
            groups: None,
        })
    }
}

fn encode_properties(p: &PublishProperties) -> Vec<u8> {
    let mut buf = BytesMut::with_capacity(p.wire_len());
    p.encode(&mut buf);
    buf.to_vec()
}

fn qos(v: u8) -> Result<QoS, RecordError> {
    QoS::from_u8(v).map_err(|_| RecordError(format!("QoS {v}")))
}

/// A message waiting in a session's offline queue: the message and what this session's
/// subscriptions made of it.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct QueuedRecord {
    pub message: MessageRecord,
    /// The QoS to deliver with.
    pub qos: u8,
    /// The RETAIN flag to deliver with.
    pub retain: bool,
    pub sub_ids: Vec<u32>,
    /// The shared subscription it came through.
    pub via_share: Option<String>,
}

impl QueuedRecord {
    pub fn from_delivery(d: &Delivery, clock: &WallClock) -> QueuedRecord {
        QueuedRecord {
            message: MessageRecord::from_message(&d.msg, clock),
            qos: d.qos.as_u8(),
            retain: d.retain,
            sub_ids: d.sub_ids.clone(),
            via_share: d.via_share.as_deref().map(str::to_owned),
        }
    }

    pub fn to_delivery(&self, clock: &WallClock) -> Result<Delivery, RecordError> {
        Ok(Delivery {
            msg: Arc::new(self.message.to_message(clock)?),
            qos: qos(self.qos)?,
            retain: self.retain,
            sub_ids: self.sub_ids.clone(),
            via_share: self.via_share.as_deref().map(Arc::from),
        })
    }
}

/// An outgoing QoS 1/2 message in flight.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct InflightRecord {
    pub queued: QueuedRecord,
    /// 0: awaiting PUBACK, 1: awaiting PUBREC, 2: awaiting PUBCOMP.
    pub state: u8,
}

impl InflightRecord {
    pub const AWAIT_PUBACK: u8 = 0;
    pub const AWAIT_PUBREC: u8 = 1;
    pub const AWAIT_PUBCOMP: u8 = 2;

    pub fn from_inflight(i: &Inflight, clock: &WallClock) -> InflightRecord {
        InflightRecord {
            queued: QueuedRecord::from_delivery(&i.delivery, clock),
            state: match i.state {
                OutState::AwaitPubAck => Self::AWAIT_PUBACK,
                OutState::AwaitPubRec => Self::AWAIT_PUBREC,
                OutState::AwaitPubComp => Self::AWAIT_PUBCOMP,
            },
        }
    }

    pub fn out_state(&self) -> Result<OutState, RecordError> {
        match self.state {
            Self::AWAIT_PUBACK => Ok(OutState::AwaitPubAck),
            Self::AWAIT_PUBREC => Ok(OutState::AwaitPubRec),
            Self::AWAIT_PUBCOMP => Ok(OutState::AwaitPubComp),
            s => Err(RecordError(format!("inflight state {s}"))),
        }
    }

    pub fn to_inflight(&self, packet_id: u16, clock: &WallClock) -> Result<Inflight, RecordError> {
        Ok(Inflight {
            packet_id: NonZeroU16::new(packet_id)
                .ok_or_else(|| RecordError("packet id 0".into()))?,
            delivery: self.queued.to_delivery(clock)?,
            state: self.out_state()?,
        })
    }
}

/// A session that outlives its connection.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    /// Session Expiry Interval in seconds (u32::MAX: never).
    pub expiry_s: u32,
    /// The protocol level byte of the last connection (3, 4 or 5).
    pub version: u8,
    pub will: Option<WillRecord>,
    /// When the client went away; `None` while it is online.
    pub disconnected_unix_ms: Option<u64>,
    pub next_packet_id: u16,
    /// Who made the session: `Some(Some(user))`, `Some(None)` for an anonymous client;
    /// `None` when unknown (a record from before owners were stored).
    pub owner: Option<Option<String>>,
}

/// A [`SessionRecord`] as format 1 stored it (no owner).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct SessionRecordV1 {
    pub expiry_s: u32,
    pub version: u8,
    pub will: Option<WillRecord>,
    pub disconnected_unix_ms: Option<u64>,
    pub next_packet_id: u16,
}

impl From<SessionRecordV1> for SessionRecord {
    fn from(r: SessionRecordV1) -> SessionRecord {
        SessionRecord {
            expiry_s: r.expiry_s,
            version: r.version,
            will: r.will,
            disconnected_unix_ms: r.disconnected_unix_ms,
            next_packet_id: r.next_packet_id,
            owner: None,
        }
    }
}

impl SessionRecord {
    pub fn protocol_version(&self) -> Result<ProtocolVersion, RecordError> {
        ProtocolVersion::ALL
            .into_iter()
            .find(|v| v.level() == self.version)
            .ok_or_else(|| RecordError(format!("protocol level {}", self.version)))
    }
}

/// A will message and its delay.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct WillRecord {
    pub message: MessageRecord,
    pub delay_s: u32,
}

impl WillRecord {
    pub fn from_will(w: &Will, clock: &WallClock) -> WillRecord {
        WillRecord {
            message: MessageRecord::from_message(&w.msg, clock),
            delay_s: w.delay_s,
        }
    }

    pub fn to_will(&self, clock: &WallClock) -> Result<Will, RecordError> {
        Ok(Will {
            msg: Arc::new(self.message.to_message(clock)?),
            delay_s: self.delay_s,
        })
    }
}

/// A subscription (its filter is in the key).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubscriptionRecord {
    /// `SubscriptionOptions::to_byte()`.
    pub options: u8,
    /// MQTT 5 Subscription Identifier.
    pub id: Option<u32>,
}

impl SubscriptionRecord {
    pub fn from_subscription(s: &Subscription) -> SubscriptionRecord {
        SubscriptionRecord {
            options: s.options.to_byte(),
            id: s.id,
        }
    }

    pub fn subscription_options(&self) -> Result<SubscriptionOptions, RecordError> {
        let b = self.options;
        let bad = || RecordError(format!("subscription options {b:#04x}"));
        if b & 0xC0 != 0 {
            return Err(bad());
        }
        let retain_handling = match (b >> 4) & 0x03 {
            0 => RetainHandling::SendAtSubscribe,
            1 => RetainHandling::SendAtSubscribeIfNew,
            2 => RetainHandling::DoNotSend,
            _ => return Err(bad()),
        };
        Ok(SubscriptionOptions {
            qos: QoS::from_u8(b & 0x03).map_err(|_| bad())?,
            no_local: b & 0x04 != 0,
            retain_as_published: b & 0x08 != 0,
            retain_handling,
        })
    }

    pub fn to_subscription(&self, filter: &str) -> Result<Subscription, RecordError> {
        Ok(Subscription {
            filter: TopicFilter::new(filter)
                .map_err(|e| RecordError(format!("topic filter {filter:?}: {e}")))?,
            options: self.subscription_options()?,
            id: self.id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::UserProperties;

    fn message(clock: &WallClock) -> Message {
        let user: UserProperties = vec![(MqttStr::new("k").unwrap(), MqttStr::new("v").unwrap())];
        Message {
            topic: TopicName::new("a/b").unwrap(),
            payload: Bytes::from_static(b"hello"),
            qos: QoS::ExactlyOnce,
            retain: true,
            properties: PublishProperties {
                payload_format_indicator: Some(true),
                message_expiry_interval: Some(60),
                topic_alias: NonZeroU16::new(3),
                response_topic: Some(TopicName::new("r/t").unwrap()),
                correlation_data: Some(Bytes::from_static(b"\x00\x01")),
                user_properties: user,
                subscription_identifiers: vec![7, 9],
                content_type: Some(MqttStr::new("text/plain").unwrap()),
            },
            origin: Some(MqttStr::new("pub-1").unwrap()),
            qos2_id: None,
            created: clock.instant - Duration::from_secs(5),
            groups: None,
        }
    }

    #[test]
    fn message_round_trips_without_hop_properties() {
        let clock = WallClock::now();
        let msg = message(&clock);
        let rec = MessageRecord::from_message(&msg, &clock);
        let value = rec.to_value().unwrap();
        let back = MessageRecord::from_value(&value).unwrap();
        assert_eq!(back, rec);
        let restored = back.to_message(&clock).unwrap();
        let mut expected = msg.clone();
        expected.properties.topic_alias = None;
        expected.properties.subscription_identifiers.clear();
        assert_eq!(restored.topic, expected.topic);
        assert_eq!(restored.payload, expected.payload);
        assert_eq!(restored.properties, expected.properties);
        assert_eq!(restored.origin, expected.origin);
        let skew = if restored.created > msg.created {
            restored.created - msg.created
        } else {
            msg.created - restored.created
        };
        assert!(skew <= Duration::from_millis(1), "{skew:?}");
        // Five seconds of a 60 s expiry are gone.
        assert_eq!(restored.remaining_expiry(clock.instant), Ok(Some(55)));
    }

    #[test]
    fn empty_properties_store_nothing() {
        let clock = WallClock::now();
        let mut msg = message(&clock);
        msg.properties = PublishProperties::default();
        let rec = MessageRecord::from_message(&msg, &clock);
        assert!(rec.properties.is_empty());
        assert_eq!(
            rec.to_message(&clock).unwrap().properties,
            PublishProperties::default()
        );
    }

    #[test]
    fn every_record_round_trips() {
        let clock = WallClock::now();
        let msg = Arc::new(message(&clock));
        let d = Delivery {
            msg: msg.clone(),
            qos: QoS::AtLeastOnce,
            retain: false,
            sub_ids: vec![1, 268_435_455],
            via_share: Some(Arc::from("$share/g/a/#")),
        };
        let q = QueuedRecord::from_delivery(&d, &clock);
        assert_eq!(QueuedRecord::from_value(&q.to_value().unwrap()).unwrap(), q);
        let d2 = q.to_delivery(&clock).unwrap();
        assert_eq!((d2.qos, d2.retain), (d.qos, d.retain));
        assert_eq!(d2.sub_ids, d.sub_ids);
        assert_eq!(d2.via_share, d.via_share);

        let inf = Inflight {
            packet_id: NonZeroU16::new(77).unwrap(),
            delivery: d,
            state: OutState::AwaitPubComp,
        };
        let ir = InflightRecord::from_inflight(&inf, &clock);
        assert_eq!(
            InflightRecord::from_value(&ir.to_value().unwrap()).unwrap(),
            ir
        );
        let inf2 = ir.to_inflight(77, &clock).unwrap();
        assert_eq!((inf2.packet_id, inf2.state), (inf.packet_id, inf.state));
        assert!(ir.to_inflight(0, &clock).is_err());

        let will = Will { msg, delay_s: 30 };
        let s = SessionRecord {
            expiry_s: u32::MAX,
            version: 5,
            will: Some(WillRecord::from_will(&will, &clock)),
            disconnected_unix_ms: Some(clock.unix_ms),
            next_packet_id: 65_535,
            owner: Some(Some("alice".into())),
        };
        let s2 = SessionRecord::from_value(&s.to_value().unwrap()).unwrap();
        assert_eq!(s2, s);
        // A record written before owners were stored reads back with no owner.
        let old = SessionRecordV1 {
            expiry_s: 60,
            version: 4,
            will: None,
            disconnected_unix_ms: None,
            next_packet_id: 1,
        };
        let body = rkyv::to_bytes::<BoxedError>(&old).unwrap();
        let mut v = frame(Kind::Session, &body);
        v[3] = 1;
        let read = SessionRecord::from_value(&v).unwrap();
        assert_eq!((read.expiry_s, read.version, read.owner), (60, 4, None));
        v[3] = SESSION_FORMAT + 1;
        assert!(
            SessionRecord::from_value(&v).is_err(),
            "a format from the future"
        );
        assert_eq!(s2.protocol_version(), Ok(ProtocolVersion::V5));
        assert_eq!(s2.will.unwrap().to_will(&clock).unwrap().delay_s, 30);

        let sub = Subscription {
            filter: TopicFilter::new("$share/g/a/+").unwrap(),
            options: SubscriptionOptions {
                qos: QoS::ExactlyOnce,
                no_local: false,
                retain_as_published: true,
                retain_handling: RetainHandling::DoNotSend,
            },
            id: Some(12),
        };
        let sr = SubscriptionRecord::from_subscription(&sub);
        let sr2 = SubscriptionRecord::from_value(&sr.to_value().unwrap()).unwrap();
        assert_eq!(sr2.to_subscription("$share/g/a/+").unwrap(), sub);
    }

    #[test]
    fn every_single_byte_flip_is_detected() {
        let clock = WallClock::now();
        let rec = QueuedRecord::from_delivery(
            &Delivery {
                msg: Arc::new(message(&clock)),
                qos: QoS::AtLeastOnce,
                retain: false,
                sub_ids: vec![],
                via_share: None,
            },
            &clock,
        );
        let value = rec.to_value().unwrap();
        for i in 0..value.len() {
            for bit in 0..8 {
                let mut v = value.clone();
                v[i] ^= 1 << bit;
                assert!(
                    QueuedRecord::from_value(&v).is_err(),
                    "flip of bit {bit} of byte {i} undetected"
                );
                assert!(queued_cost(&v).is_err());
            }
        }
        assert!(QueuedRecord::from_value(&value[..value.len() - 1]).is_err());
        assert!(QueuedRecord::from_value(&value[..3]).is_err());
        assert_eq!(queued_cost(&value), Ok(5 + 3));
    }

    #[test]
    fn a_record_under_the_wrong_kind_is_refused() {
        let sub = SubscriptionRecord {
            options: 1,
            id: None,
        };
        let err = SessionRecord::from_value(&sub.to_value().unwrap()).unwrap_err();
        assert!(err.contains("kind"), "{err}");
    }

    #[test]
    fn invalid_field_values_are_errors_not_panics() {
        let clock = WallClock::now();
        let mut rec = MessageRecord::from_message(&message(&clock), &clock);
        rec.qos = 3;
        assert!(rec.to_message(&clock).is_err());
        rec.qos = 1;
        rec.topic = "a/#".into();
        assert!(rec.to_message(&clock).is_err());
        rec.topic = "a".into();
        rec.properties = vec![0x05, 0xFF];
        assert!(rec.to_message(&clock).is_err());
        let bad = SubscriptionRecord {
            options: 0x30,
            id: None,
        };
        assert!(bad.subscription_options().is_err());
        let s = SessionRecord {
            expiry_s: 0,
            version: 9,
            will: None,
            disconnected_unix_ms: None,
            next_packet_id: 1,
            owner: None,
        };
        assert!(s.protocol_version().is_err());
    }

    #[test]
    fn wall_clock_conversions() {
        let clock = WallClock::now();
        let t = clock.instant - Duration::from_millis(1500);
        assert_eq!(clock.unix_ms_of(t), clock.unix_ms - 1500);
        assert_eq!(clock.instant_of(clock.unix_ms - 1500), t);
        // A creation time in the future (clock stepped back) reads as now.
        assert_eq!(clock.instant_of(clock.unix_ms + 10_000), clock.instant);
    }
}
