//! Reading CONNECT on the accepting shard, bounded in time and size, and deciding where
//! the connection is served (here, or at the shard that owns its client id); answering a
//! CONNECT that cannot be accepted.

use bytes::BytesMut;
use futures_lite::{future, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use std::time::{Duration, Instant};

use crate::protocol::{
    decode, fixed_header, packet_type, ConnAck, Connect, DecodeError, DecodeLimits, MqttStr,
    Packet, ProtocolVersion, ReasonCode,
};
use crate::session::owner_shard;
use crate::shard::api::Placement;
use crate::shard::service::BrokerShard;
use shards::Shard;

/// Bytes read at a time while waiting for CONNECT.
pub(super) const CONNECT_READ_BYTES: usize = 256;
/// The most one read of a CONNECT's body asks for (a big CONNECT, a will with a large
/// payload, is read in chunks of this size).
pub(super) const CONNECT_CHUNK_BYTES: usize = 64 * 1024;
/// Reads until CONNECT decodes, bounded by the connect timeout and the packet limit; returns
/// it with its size. Every byte read stays in `buf` (a hand-off passes them on). Linear in
/// the packet's size: the fixed header is checked as soon as it is in (type, flags,
/// announced length against the limit), the body is read in chunks that grow with what has
/// arrived (so that memory follows what the client really sent, not what it announced) up
/// to [`CONNECT_CHUNK_BYTES`], and the CONNECT is decoded once, when all of it is in; the
/// task yields between reads.
pub(super) async fn read_connect<R: AsyncRead + Unpin>(
    stream: &mut R,
    buf: &mut BytesMut,
    max_packet: usize,
    timeout: Duration,
) -> Result<(Box<Connect>, usize), ConnectFailure> {
    let limits = DecodeLimits::new(max_packet, None);
    let deadline = Instant::now() + timeout;
    let mut total = None;
    loop {
        if total.is_none() {
            // The fixed header (at most 5 bytes): refused at once if wrong or too large.
            match fixed_header(buf, &limits) {
                Ok(Some(h)) if h.ptype != packet_type::CONNECT => {
                    return Err(ConnectFailure::Decode(DecodeError::ExpectedConnect))
                }
                Ok(h) => total = h.map(|h| h.total),
                Err(e) => return Err(ConnectFailure::Decode(e)),
            }
        }
        if let Some(t) = total.filter(|&t| buf.len() >= t) {
            return match decode(&mut BytesMut::from(&buf[..t]), &limits) {
                Ok(Some(Packet::Connect(c))) => Ok((c, t)),
                Ok(_) => Err(ConnectFailure::Decode(DecodeError::ExpectedConnect)),
                Err(e) => Err(ConnectFailure::Decode(e)),
            };
        }
        let want = total.map_or(CONNECT_READ_BYTES, |t| {
            (t - buf.len())
                .min(buf.len().max(CONNECT_READ_BYTES))
                .min(CONNECT_CHUNK_BYTES)
        });
        let left = deadline.saturating_duration_since(Instant::now());
        // Read straight into the buffer: no array in this future, which lives as long as
        // the connection's task.
        let start = buf.len();
        buf.resize(start + want, 0);
        let n = future::or(
            async { Some(stream.read(&mut buf[start..]).await) },
            async {
                glommio::timer::sleep(left).await;
                None
            },
        )
        .await;
        let got = match n {
            Some(Ok(n)) => n,
            _ => 0,
        };
        buf.truncate(start + got);
        match n {
            None => return Err(ConnectFailure::Timeout),
            Some(Ok(0)) | Some(Err(_)) => return Err(ConnectFailure::Closed),
            Some(Ok(_)) => {}
        }
        glommio::yield_if_needed().await;
    }
}

#[derive(Debug)]
pub(super) enum ConnectFailure {
    Timeout,
    Closed,
    Decode(DecodeError),
}

/// The protocol level a CONNECT claims, read straight from its bytes (for answering a
/// CONNECT that does not decode in the client's own version).
pub(super) fn sniff_level(buf: &[u8]) -> Option<u8> {
    let mut i = 1;
    while i < buf.len() && i < 5 && buf[i] & 0x80 != 0 {
        i += 1;
    }
    let start = i + 1;
    let name_len = u16::from_be_bytes([*buf.get(start)?, *buf.get(start + 1)?]) as usize;
    buf.get(start + 2 + name_len).copied()
}

/// The connect timeout and packet limit of this shard's configuration.
pub(super) fn handshake_limits(shard: &Shard<BrokerShard>) -> (usize, Duration) {
    let cfg = shard.service().config();
    let l = &cfg.limits;
    (
        l.packet_bytes_max as usize,
        Duration::from_secs(l.connect_timeout_s as u64),
    )
}

/// What the accepting shard does with a CONNECT it read.
pub(super) enum Placed {
    /// Serve it here; the bytes after the CONNECT.
    Here {
        connect: Box<Connect>,
        rest: BytesMut,
        assigned: Option<MqttStr>,
    },
    /// Hand it to the owner shard, with every byte read.
    Owner { owner: usize, bytes: BytesMut },
    /// Relay it to the node that owns the client (a cluster), with every byte read.
    Node {
        addr: std::net::SocketAddr,
        bytes: BytesMut,
        version: ProtocolVersion,
    },
    /// Refused (answered already) or lost.
    Done,
}

/// Reads CONNECT from `reader` and decides where the connection is served; refusals are
/// written to `writer`.
pub(super) async fn place<R, W>(
    shard: &Shard<BrokerShard>,
    reader: &mut R,
    writer: &mut W,
    timeout: Duration,
    relayed: bool,
) -> Placed
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (max_packet, _) = handshake_limits(shard);
    let mut buf = BytesMut::new();
    let read = read_connect(reader, &mut buf, max_packet, timeout).await;
    shard.service().io.add_in(buf.len());
    let (connect, connect_len) = match read {
        Ok(c) => c,
        Err(ConnectFailure::Decode(e)) => {
            refuse_undecodable(writer, &buf, &e).await;
            return Placed::Done;
        }
        Err(_) => return Placed::Done,
    };
    let version = connect.protocol;
    let mut assigned = None;
    if connect.client_id.is_empty() {
        let allowed = match version {
            ProtocolVersion::V5 => true,
            ProtocolVersion::V3_1_1 => connect.clean_start,
            ProtocolVersion::V3_1 => false,
        };
        if !allowed {
            refuse(writer, version, ReasonCode::ClientIdentifierNotValid).await;
            return Placed::Done;
        }
        assigned = assign_owned_id(shard);
        if assigned.is_none() && relayed {
            refuse(writer, version, ReasonCode::ServerUnavailable).await;
            return Placed::Done;
        }
        if assigned.is_none() {
            // A cluster node that owns no slot (or almost none): the client gets its id
            // where it is served.
            return match shard.service().any_owner() {
                Placement::Node(addr) => Placed::Node {
                    addr,
                    bytes: buf,
                    version,
                },
                _ => {
                    refuse(writer, version, ReasonCode::ServerUnavailable).await;
                    Placed::Done
                }
            };
        }
    }
    let placement = match &assigned {
        Some(_) => Placement::Here,
        None => shard.service().placement(connect.client_id.as_bytes()),
    };
    match placement {
        Placement::Here => {}
        // Relayed here by a node that thinks this one owns the client: never a second hop
        // (the client retries once the nodes agree).
        Placement::Node(_) if relayed => {
            refuse(writer, version, ReasonCode::ServerUnavailable).await;
            return Placed::Done;
        }
        Placement::Node(addr) => {
            return Placed::Node {
                addr,
                bytes: buf,
                version,
            }
        }
        Placement::Unavailable => {
            refuse(writer, version, ReasonCode::ServerUnavailable).await;
            return Placed::Done;
        }
    }
    let owner = match &assigned {
        Some(_) => shard.id().index(),
        None => owner_shard(connect.client_id.as_bytes(), shard.count()),
    };
    if owner == shard.id().index() {
        let mut rest = buf;
        bytes::Buf::advance(&mut rest, connect_len);
        Placed::Here {
            connect,
            rest,
            assigned,
        }
    } else {
        Placed::Owner { owner, bytes: buf }
    }
}

/// A client id for a client that sent none, in a slot this node owns (a broker alone owns
/// them all); `None` when this node owns no slot, or so few that 256 tries missed them.
fn assign_owned_id(shard: &Shard<BrokerShard>) -> Option<MqttStr> {
    let svc = shard.service();
    if !svc.owns_slots() {
        return None;
    }
    (0..256)
        .map(|_| svc.assign_client_id(svc.next_seed()))
        .find(|id| svc.placement(id.as_bytes()) == Placement::Here)
}

/// Answers a CONNECT that did not decode: a CONNACK in the version the client claims when
/// the specification asks for one, then close.
pub(super) async fn refuse_undecodable<W: AsyncWrite + Unpin>(
    stream: &mut W,
    buf: &[u8],
    e: &DecodeError,
) {
    tracing::debug!(error = %e, "bad CONNECT");
    match (e, sniff_level(buf)) {
        (DecodeError::UnsupportedProtocolVersion(_), _) => {
            // 3.1.1 3.1.2.2: return code 0x01, in the 3.1.1 format any client can read.
            refuse(
                stream,
                ProtocolVersion::V3_1_1,
                ReasonCode::UnsupportedProtocolVersion,
            )
            .await
        }
        (_, Some(5)) => refuse(stream, ProtocolVersion::V5, e.reason_code()).await,
        _ => {}
    }
}

pub(super) async fn refuse<W: AsyncWrite + Unpin>(
    stream: &mut W,
    version: ProtocolVersion,
    rc: ReasonCode,
) {
    let mut out = BytesMut::new();
    let ack = Packet::ConnAck(Box::new(ConnAck {
        session_present: false,
        reason_code: rc,
        properties: Default::default(),
    }));
    if ack.encode(version, &mut out).is_ok() {
        let _ = stream.write_all(&out).await;
        let _ = stream.flush().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffs_the_protocol_level() {
        let v5 = [0x10, 0x10, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02];
        assert_eq!(sniff_level(&v5), Some(5));
        assert_eq!(sniff_level(&v5[..5]), None);
    }
}
