//! The node-to-node frames after the handshake: pure encoding and decoding, every field
//! checked (a peer is trusted to be a shardmq node of this cluster, not to be bug-free).
//!
//! A frame is `[u32 BE length][kind][payload]` (`link.rs` reads and writes the envelope).
//! Integers are big-endian; strings are `[u16 length][UTF-8]`.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::time::{Duration, Instant};

use crate::protocol::wire::Reader;
use crate::protocol::{MqttStr, PublishProperties, QoS, TopicName};
use crate::session::{Message, Qos2Id, SharedMessage};
use crate::shard::event::{Fate, RetainVersion};
use crate::storage::{ClientEntry, Space};

pub const HELLO: u8 = 1;
pub const PING: u8 = 2;
pub const PONG: u8 = 3;
/// Forget every route of the sender (its full set follows).
pub const ROUTES_RESET: u8 = 10;
/// `[u8 add][u64 ack id, 0: none][filter]`.
pub const ROUTE: u8 = 11;
/// The sender's full set (after a ROUTES_RESET) is complete.
pub const ROUTES_END: u8 = 13;
/// `[u64 ack id]`: the sender applied that route on every shard.
pub const ROUTE_ACK: u8 = 12;
/// `[u64 id, 0: no answer wanted][message]`.
pub const PUBLISH: u8 = 20;
/// `[u64 id][u8 ok][u8 fate]`: the answer to a PUBLISH or a RELEASE.
pub const PUB_ACK: u8 = 21;
/// `[u64 id, 0: no answer wanted][u8 has packet id][u16 packet id][origin]`: forget the
/// QoS 2 dedup key (origin, packet id), or every key of origin.
pub const RELEASE: u8 = 22;
/// `[client id][u16 packet id][origin]`: the session of client id, moved to the receiver
/// by the sender, forgot the QoS 2 dedup key (origin, packet id) after the sender read it
/// for the move (no answer).
pub const FORGET: u8 = 23;
/// (empty): send me every retained message you hold (a node that has just started).
pub const RETAINED_WANTED: u8 = 24;
/// `[u64 version ns][u16 version shard][message]`: one retained message, with the version
/// of the write the sender holds (the receiver keeps it only if that is newer than its own);
/// an empty one is a deletion the sender remembers (the receiver deletes an older copy).
pub const RETAINED: u8 = 25;
/// `[u8 cut short]`: the retained messages asked for are all sent (1: some were left out,
/// past the link's buffer bound).
pub const RETAINED_END: u8 = 26;
/// `[u64 id][node]`: send me the QoS 2 key releases you kept for `node` (it missed them:
/// it was down, or did not answer); the sender is rebuilding `node`'s sessions from its
/// stream, which may still hold those keys.
pub const MISSED_WANTED: u8 = 27;
/// `[u64 id][u8 last][u16 count][count x ([u8 has packet id][u16 packet id][origin])]`:
/// part of the answer to `MISSED_WANTED` `id` (`last`: the whole of it is sent).
pub const MISSED: u8 = 28;

/// QoS 2 key releases in one `MISSED` frame, at most.
pub const MISSED_PER_FRAME: usize = 1024;
/// Bytes of releases in one `MISSED` frame, at most (one bigger release goes alone): well
/// within any receiver's frame bound (`limits.packet_bytes_max` plus 64 KiB).
pub const MISSED_PART_BYTES: usize = 32 << 10;

/// `[u64 id][client id][u8 last][u32 count]` then per record `[u8 keyspace][u16 length][key
/// after the client's prefix][u32 length][value]`: part of a session moving to the
/// receiver (its records as stored, the session record first); the last part is answered
/// with a `PUB_ACK` of the id once the receiver has stored it and routes its filters.
pub const SESSION: u8 = 30;

/// A data frame, decoded.
#[derive(Debug)]
pub enum Frame {
    RoutesReset,
    RoutesEnd,
    Route {
        add: bool,
        ack: u64,
        filter: String,
    },
    RouteAck(u64),
    Publish {
        id: u64,
        msg: SharedMessage,
    },
    PubAck {
        id: u64,
        ok: bool,
        fate: Fate,
    },
    Release {
        id: u64,
        origin: MqttStr,
        packet_id: Option<u16>,
    },
    Session {
        id: u64,
        client_id: String,
        last: bool,
        entries: Vec<ClientEntry>,
    },
    Forget {
        client_id: MqttStr,
        origin: MqttStr,
        packet_id: u16,
    },
    RetainedWanted,
    Retained {
        version: RetainVersion,
        msg: SharedMessage,
    },
    RetainedEnd {
        cut_short: bool,
    },
    MissedWanted {
        id: u64,
        node: String,
    },
    Missed {
        id: u64,
        last: bool,
        releases: Vec<(MqttStr, Option<u16>)>,
    },
}

/// Bytes of a moved session's records in one `SESSION` frame (a bigger record goes alone).
pub const SESSION_PART_BYTES: usize = 256 << 10;

/// Appends a session's records as `SESSION` frames of about `part_bytes` each (a bigger
/// record goes alone).
pub fn session(
    out: &mut BytesMut,
    id: u64,
    client_id: &str,
    entries: &[ClientEntry],
    part_bytes: usize,
) {
    let mut rest = entries;
    loop {
        let mut n = 0;
        let mut bytes = 0;
        while n < rest.len() && (n == 0 || bytes + entry_len(&rest[n]) <= part_bytes) {
            bytes += entry_len(&rest[n]);
            n += 1;
        }
        let (part, after) = rest.split_at(n);
        frame(out, SESSION, |b| {
            b.put_u64(id);
            put_str(b, client_id);
            b.put_u8(u8::from(after.is_empty()));
            b.put_u32(part.len() as u32);
            for e in part {
                b.put_u8(e.space.code());
                b.put_u16(e.rest.len() as u16);
                b.put_slice(&e.rest);
                b.put_u32(e.value.len() as u32);
                b.put_slice(&e.value);
            }
        });
        if after.is_empty() {
            return;
        }
        rest = after;
    }
}

fn entry_len(e: &ClientEntry) -> usize {
    7 + e.rest.len() + e.value.len()
}

/// Appends a whole frame (envelope included) to `out`.
fn frame(out: &mut BytesMut, kind: u8, body: impl FnOnce(&mut BytesMut)) {
    let start = out.len();
    out.put_u32(0);
    out.put_u8(kind);
    body(out);
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

fn put_str(out: &mut BytesMut, s: &str) {
    let b = s.as_bytes();
    out.put_u16(b.len().min(u16::MAX as usize) as u16);
    out.put_slice(&b[..b.len().min(u16::MAX as usize)]);
}

pub fn routes_reset(out: &mut BytesMut) {
    frame(out, ROUTES_RESET, |_| {});
}

pub fn routes_end(out: &mut BytesMut) {
    frame(out, ROUTES_END, |_| {});
}

pub fn route(out: &mut BytesMut, add: bool, ack: u64, filter: &str) {
    frame(out, ROUTE, |b| {
        b.put_u8(u8::from(add));
        b.put_u64(ack);
        put_str(b, filter);
    });
}

pub fn route_ack(out: &mut BytesMut, ack: u64) {
    frame(out, ROUTE_ACK, |b| b.put_u64(ack));
}

pub fn pub_ack(out: &mut BytesMut, id: u64, ok: bool, fate: Fate) {
    frame(out, PUB_ACK, |b| {
        b.put_u64(id);
        b.put_u8(u8::from(ok));
        b.put_u8(
            u8::from(fate.kept)
                | u8::from(fate.queue_full) << 1
                | u8::from(fate.budget_spent) << 2
                | u8::from(fate.moving) << 3,
        );
    });
}

pub fn release(out: &mut BytesMut, id: u64, origin: &str, packet_id: Option<u16>) {
    frame(out, RELEASE, |b| {
        b.put_u64(id);
        put_release(b, origin, packet_id);
    });
}

/// Asks for the releases the receiver kept for `node` (see [`MISSED_WANTED`]).
pub fn missed_wanted(out: &mut BytesMut, id: u64, node: &str) {
    frame(out, MISSED_WANTED, |b| {
        b.put_u64(id);
        put_str(b, node);
    });
}

/// The answer to `MISSED_WANTED` `id`: `releases` in frames of at most
/// [`MISSED_PER_FRAME`] releases and about [`MISSED_PART_BYTES`], the last one marked (one
/// empty frame when there are none).
pub fn missed(out: &mut BytesMut, id: u64, releases: &[(MqttStr, Option<u16>)]) {
    let len = |r: &(MqttStr, Option<u16>)| 5 + r.0.as_str().len();
    let mut rest = releases;
    loop {
        let mut n = 0;
        let mut bytes = 0;
        while n < rest.len()
            && n < MISSED_PER_FRAME
            && (n == 0 || bytes + len(&rest[n]) <= MISSED_PART_BYTES)
        {
            bytes += len(&rest[n]);
            n += 1;
        }
        let (part, after) = rest.split_at(n);
        frame(out, MISSED, |b| {
            b.put_u64(id);
            b.put_u8(u8::from(after.is_empty()));
            b.put_u16(part.len() as u16);
            for (origin, packet_id) in part {
                put_release(b, origin.as_str(), *packet_id);
            }
        });
        if after.is_empty() {
            return;
        }
        rest = after;
    }
}

pub fn forget(out: &mut BytesMut, client_id: &str, origin: &str, packet_id: u16) {
    frame(out, FORGET, |b| {
        put_str(b, client_id);
        b.put_u16(packet_id);
        put_str(b, origin);
    });
}

/// The most shared groups one forwarded message names (more are not forwarded).
pub const GROUPS_PER_MESSAGE_MAX: usize = 4096;

/// A message: topic, QoS, retain, age (ms since the broker received it: expiry goes on
/// counting), origin, the shared groups the receiving node delivers it to (`[u16
/// count][key...]`; no others), the MQTT 5 property block as the codec writes it, then the
/// payload.
pub fn publish(
    out: &mut BytesMut,
    id: u64,
    msg: &Message,
    groups: impl ExactSizeIterator<Item = impl AsRef<str>>,
    now: Instant,
) {
    frame(out, PUBLISH, |b| {
        b.put_u64(id);
        put_message(b, msg, groups, now);
    });
}

/// Asks the receiver for every retained message it holds.
pub fn retained_wanted(out: &mut BytesMut) {
    frame(out, RETAINED_WANTED, |_| {});
}

/// One retained message with its version (no shared groups).
pub fn retained(out: &mut BytesMut, version: RetainVersion, msg: &Message, now: Instant) {
    frame(out, RETAINED, |b| {
        b.put_u64(version.at_ns);
        b.put_u16(version.shard);
        put_message(b, msg, std::iter::empty::<&str>(), now);
    });
}

/// The end of the retained messages asked for (`cut_short`: not all of them).
pub fn retained_end(out: &mut BytesMut, cut_short: bool) {
    frame(out, RETAINED_END, |b| b.put_u8(u8::from(cut_short)));
}

fn put_message(
    b: &mut BytesMut,
    msg: &Message,
    groups: impl ExactSizeIterator<Item = impl AsRef<str>>,
    now: Instant,
) {
    {
        put_str(b, msg.topic.as_str());
        b.put_u8(msg.qos.as_u8());
        b.put_u8(u8::from(msg.retain));
        let age = now.saturating_duration_since(msg.created).as_millis();
        b.put_u32(age.min(u32::MAX as u128) as u32);
        match &msg.origin {
            Some(o) => {
                b.put_u8(1);
                put_str(b, o.as_str());
            }
            None => b.put_u8(0),
        }
        // The QoS 2 dedup key (with the origin): bit 0 present, bit 1 DUP.
        match msg.qos2_id {
            Some(q) => {
                b.put_u8(1 | u8::from(q.dup) << 1);
                b.put_u16(q.packet_id);
            }
            None => {
                b.put_u8(0);
                b.put_u16(0);
            }
        }
        let n = groups.len().min(GROUPS_PER_MESSAGE_MAX);
        b.put_u16(n as u16);
        for key in groups.take(n) {
            put_str(b, key.as_ref());
        }
        let mut p = msg.properties.clone();
        p.topic_alias = None;
        p.subscription_identifiers.clear();
        p.encode(b);
        b.put_slice(&msg.payload);
    }
}

/// Reads a frame's payload; `Err` names what is wrong.
pub fn decode(kind: u8, body: Bytes, now: Instant) -> Result<Frame, String> {
    let mut b = body;
    let frame = match kind {
        ROUTES_RESET => Frame::RoutesReset,
        ROUTES_END => Frame::RoutesEnd,
        ROUTE => {
            let add = match u8_of(&mut b)? {
                0 => false,
                1 => true,
                x => return Err(format!("route flag {x}")),
            };
            let ack = u64_of(&mut b)?;
            let filter = str_of(&mut b)?;
            crate::protocol::TopicFilter::new(&filter)
                .map_err(|e| format!("route filter {filter:?}: {e}"))?;
            Frame::Route { add, ack, filter }
        }
        ROUTE_ACK => Frame::RouteAck(u64_of(&mut b)?),
        PUB_ACK => {
            let id = u64_of(&mut b)?;
            let ok = u8_of(&mut b)? == 1;
            let f = u8_of(&mut b)?;
            let fate = Fate {
                kept: f & 1 != 0,
                queue_full: f & 2 != 0,
                budget_spent: f & 4 != 0,
                moving: f & 8 != 0,
            };
            Frame::PubAck { id, ok, fate }
        }
        RELEASE => {
            let id = u64_of(&mut b)?;
            let (origin, packet_id) = release_of(&mut b)?;
            Frame::Release {
                id,
                origin,
                packet_id,
            }
        }
        FORGET => {
            let c = str_of(&mut b)?;
            let client_id = MqttStr::new(&c).map_err(|e| format!("client id {c:?}: {e}"))?;
            let packet_id = u16_of(&mut b)?;
            if packet_id == 0 {
                return Err("forget of packet id 0".into());
            }
            let o = str_of(&mut b)?;
            let origin = MqttStr::new(&o).map_err(|e| format!("origin {o:?}: {e}"))?;
            Frame::Forget {
                client_id,
                origin,
                packet_id,
            }
        }
        SESSION => {
            let id = u64_of(&mut b)?;
            let client_id = str_of(&mut b)?;
            let last = u8_of(&mut b)? == 1;
            let n = u32_of(&mut b)? as usize;
            // Each record takes at least 7 bytes: a count past the frame is a lie.
            if n > b.remaining() / 7 {
                return Err(format!("{n} records in {} bytes", b.remaining()));
            }
            let mut entries = Vec::with_capacity(n);
            for _ in 0..n {
                let code = u8_of(&mut b)?;
                let space = Space::of_client_code(code)
                    .ok_or_else(|| format!("keyspace {code} in a session"))?;
                let len = u16_of(&mut b)? as usize;
                if b.remaining() < len {
                    return Err("frame too short".into());
                }
                let rest = b.split_to(len).to_vec();
                let len = u32_of(&mut b)? as usize;
                if b.remaining() < len {
                    return Err("frame too short".into());
                }
                let value = b.split_to(len).to_vec();
                entries.push(ClientEntry { space, rest, value });
            }
            Frame::Session {
                id,
                client_id,
                last,
                entries,
            }
        }
        PUBLISH => {
            let id = u64_of(&mut b)?;
            Frame::Publish {
                id,
                msg: std::sync::Arc::new(message_of(&mut b, now)?),
            }
        }
        RETAINED_WANTED => Frame::RetainedWanted,
        RETAINED => {
            let at_ns = u64_of(&mut b)?;
            let shard = u16_of(&mut b)?;
            let msg = message_of(&mut b, now)?;
            // An empty payload is a deletion the sender remembers.
            if !msg.retain || msg.qos2_id.is_some() {
                return Err("a retained message that is not one".into());
            }
            Frame::Retained {
                version: RetainVersion { at_ns, shard },
                msg: std::sync::Arc::new(msg),
            }
        }
        MISSED_WANTED => Frame::MissedWanted {
            id: u64_of(&mut b)?,
            node: str_of(&mut b)?,
        },
        MISSED => {
            let id = u64_of(&mut b)?;
            let last = match u8_of(&mut b)? {
                0 => false,
                1 => true,
                x => return Err(format!("missed last flag {x}")),
            };
            if b.remaining() < 2 {
                return Err("frame too short".into());
            }
            let n = b.get_u16() as usize;
            if n > MISSED_PER_FRAME {
                return Err(format!("{n} releases in one frame"));
            }
            let mut releases = Vec::with_capacity(n);
            for _ in 0..n {
                releases.push(release_of(&mut b)?);
            }
            Frame::Missed { id, last, releases }
        }
        RETAINED_END => Frame::RetainedEnd {
            cut_short: match u8_of(&mut b)? {
                0 => false,
                1 => true,
                x => return Err(format!("retained end flag {x}")),
            },
        },
        k => return Err(format!("unknown frame kind {k}")),
    };
    if kind != PUBLISH && kind != RETAINED && b.has_remaining() {
        return Err(format!(
            "{} bytes after a frame of kind {kind}",
            b.remaining()
        ));
    }
    Ok(frame)
}

fn message_of(b: &mut Bytes, now: Instant) -> Result<Message, String> {
    let topic = str_of(b)?;
    let topic = TopicName::new(&topic).map_err(|e| format!("topic {topic:?}: {e}"))?;
    let qos = match u8_of(b)? {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        2 => QoS::ExactlyOnce,
        x => return Err(format!("QoS {x}")),
    };
    let retain = u8_of(b)? == 1;
    let age = Duration::from_millis(u32_of(b)? as u64);
    let origin = match u8_of(b)? {
        0 => None,
        _ => {
            let o = str_of(b)?;
            Some(MqttStr::new(&o).map_err(|e| format!("origin {o:?}: {e}"))?)
        }
    };
    let q = u8_of(b)?;
    if b.remaining() < 2 {
        return Err("frame too short".into());
    }
    let packet_id = b.get_u16();
    let qos2_id = match q {
        0 => None,
        _ if origin.is_none() || qos != QoS::ExactlyOnce || packet_id == 0 => {
            return Err("a QoS 2 key without an origin, QoS 2 or a packet id".into())
        }
        1 | 3 => Some(Qos2Id {
            packet_id,
            dup: q & 2 != 0,
        }),
        x => return Err(format!("QoS 2 key flags {x}")),
    };
    let count = u16_of(b)? as usize;
    if count > GROUPS_PER_MESSAGE_MAX {
        return Err(format!("{count} shared groups"));
    }
    let mut groups: Vec<std::sync::Arc<str>> = Vec::with_capacity(count);
    for _ in 0..count {
        let key = str_of(b)?;
        match crate::protocol::TopicFilter::new(&key) {
            Ok(f) if f.share_group().is_some() => groups.push(key.into()),
            _ => return Err(format!("shared group {key:?}")),
        }
    }
    let mut r = Reader::new(std::mem::take(b));
    let properties =
        PublishProperties::decode(&mut r).map_err(|e| format!("publish properties: {e}"))?;
    let payload = r.rest();
    Ok(Message {
        topic,
        payload,
        qos,
        retain,
        properties,
        origin,
        qos2_id,
        created: now.checked_sub(age).unwrap_or(now),
        groups: Some(groups.into()),
    })
}

fn u8_of(b: &mut Bytes) -> Result<u8, String> {
    if b.remaining() < 1 {
        return Err("frame too short".into());
    }
    Ok(b.get_u8())
}

fn u16_of(b: &mut Bytes) -> Result<u16, String> {
    if b.remaining() < 2 {
        return Err("frame too short".into());
    }
    Ok(b.get_u16())
}

fn u32_of(b: &mut Bytes) -> Result<u32, String> {
    if b.remaining() < 4 {
        return Err("frame too short".into());
    }
    Ok(b.get_u32())
}

fn u64_of(b: &mut Bytes) -> Result<u64, String> {
    if b.remaining() < 8 {
        return Err("frame too short".into());
    }
    Ok(b.get_u64())
}

/// `[u8 has packet id][u16 packet id][origin]`: a QoS 2 key release (`None`: every key of
/// origin).
fn release_of(b: &mut Bytes) -> Result<(MqttStr, Option<u16>), String> {
    let has = u8_of(b)?;
    if b.remaining() < 2 {
        return Err("frame too short".into());
    }
    let pid = b.get_u16();
    let o = str_of(b)?;
    let origin = MqttStr::new(&o).map_err(|e| format!("origin {o:?}: {e}"))?;
    let packet_id = match has {
        0 => None,
        1 if pid != 0 => Some(pid),
        _ => return Err("release of packet id 0".into()),
    };
    Ok((origin, packet_id))
}

fn put_release(b: &mut BytesMut, origin: &str, packet_id: Option<u16>) {
    b.put_u8(u8::from(packet_id.is_some()));
    b.put_u16(packet_id.unwrap_or(0));
    put_str(b, origin);
}

fn str_of(b: &mut Bytes) -> Result<String, String> {
    if b.remaining() < 2 {
        return Err("frame too short".into());
    }
    let n = b.get_u16() as usize;
    if b.remaining() < n {
        return Err("string past the frame's end".into());
    }
    let s = b.split_to(n);
    String::from_utf8(s.to_vec()).map_err(|_| "string not UTF-8".to_string())
}

#[cfg(test)]
mod tests;
