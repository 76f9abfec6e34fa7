//! Moving a connection to the shard that owns its client: the accepting side sends the
//! socket (an owned fd) with the bytes read so far; the owning side's hand-off loop serves
//! what arrives. The shard service only queues arrivals; serving them is this module's.

use bytes::BytesMut;
use glommio::net::{TcpStream, UnixStream};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};

use crate::protocol::{decode, DecodeLimits, Packet};
use crate::shard::event::{ConnGuard, Handoff, HandoffSocket, Mail};
use crate::shard::service::BrokerShard;
use shards::{Shard, ShardId};

use super::conn::{serve, Client};
use super::connect::{handshake_limits, place, Placed};

/// Sends a connection to its owner shard; on failure (the owner is stopping) the hand-off
/// is dropped, which closes its socket.
pub(super) async fn hand_off(shard: &Shard<BrokerShard>, owner: usize, handoff: Handoff) {
    shard.service().note_handoff();
    let _ = shard
        .send_to(ShardId::new(owner), Mail::Handoff(Box::new(handoff)))
        .await;
}

/// Serves the connections other shards hand to this one, each in a task of its own, until
/// the shard stops.
pub async fn handoff_loop(shard: Shard<BrokerShard>) {
    let stopped = shard.stopped();
    futures_lite::pin!(stopped);
    loop {
        let next = futures_lite::future::or(
            async { Some(shard.service().next_handoff().await) },
            async {
                (&mut stopped).await;
                None
            },
        );
        let Some(handoff) = next.await else {
            shard.service().drop_arrivals();
            return;
        };
        let shard = shard.clone();
        glommio::spawn_local(async move {
            if !shard.service().admit_connection() {
                return; // dropping the hand-off closes its socket
            }
            serve_handoff(shard.clone(), *handoff).await;
            shard.service().release_connection();
        })
        .detach();
    }
}

/// On the accepting shard, for a plain TCP connection: reads CONNECT, then serves the
/// connection here or hands the socket to the shard that owns the client.
pub(super) async fn handshake(
    shard: Shard<BrokerShard>,
    stream: TcpStream,
    guard: Option<ConnGuard>,
    relayed: bool,
) {
    let _ = stream.set_nodelay(true);
    let (_, timeout) = handshake_limits(&shard);
    let raw_fd = stream.as_raw_fd();
    let peer = stream.peer_addr().ok();
    let (mut reader, mut writer) = futures_lite::io::split(stream);
    // The three steps are boxed: awaited inline, their futures (`serve`'s, the connection's,
    // in practice more than once) would be stored in this task for the connection's life.
    let placed = Box::pin(place(&shard, &mut reader, &mut writer, timeout, relayed)).await;
    let (owner, bytes) = match placed {
        Placed::Done => return,
        Placed::Here {
            connect,
            rest,
            assigned,
        } => {
            let client = Client {
                addr: peer,
                cert_identity: None,
            };
            Box::pin(serve(
                shard, reader, writer, connect, rest, assigned, client,
            ))
            .await;
            drop(guard);
            return;
        }
        Placed::Owner { owner, bytes } => (owner, bytes),
        Placed::Node {
            addr,
            bytes,
            version,
        } => {
            Box::pin(super::relay::relay_to_node(
                reader, writer, addr, bytes, version,
            ))
            .await;
            drop(guard);
            return;
        }
    };
    // Hand the socket to its owner: duplicate the fd (dropping the stream closes its own),
    // then send the copy with every byte read so far.
    // SAFETY: the halves still hold the stream, so `raw_fd` is open for the borrow.
    let dup = unsafe { std::os::fd::BorrowedFd::borrow_raw(raw_fd) }.try_clone_to_owned();
    drop((reader, writer));
    let fd = match dup {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!(error = %e, "hand-off dup failed");
            return;
        }
    };
    let handoff = Handoff {
        fd,
        socket: HandoffSocket::Tcp,
        bytes: bytes.freeze(),
        peer,
        cert_identity: None,
        guard,
    };
    Box::pin(hand_off(&shard, owner, handoff)).await;
}

/// On the owning shard: takes over a socket handed over by another shard.
pub async fn serve_handoff(shard: Shard<BrokerShard>, handoff: Handoff) {
    let Handoff {
        fd,
        socket,
        bytes,
        peer,
        cert_identity,
        guard,
    } = handoff;
    let client = Client {
        addr: peer,
        cert_identity,
    };
    let max_packet = shard.service().config().limits.packet_bytes_max as usize;
    let mut buf = BytesMut::from(&bytes[..]);
    let connect = match decode(&mut buf, &DecodeLimits::new(max_packet, None)) {
        Ok(Some(Packet::Connect(c))) => Some(c),
        _ => {
            tracing::warn!("hand-off without a CONNECT; closing");
            None
        }
    };
    // `serve` is boxed for the same reason as in `handshake`.
    match socket {
        HandoffSocket::Tcp => {
            // SAFETY: the accepting shard duplicated this fd for us; the stream owns it now.
            let stream = unsafe { TcpStream::from_raw_fd(fd.into_raw_fd()) };
            if let Some(c) = connect {
                let (r, w) = futures_lite::io::split(stream);
                Box::pin(serve(shard, r, w, c, buf, None, client)).await;
            }
        }
        HandoffSocket::Unix => {
            // SAFETY: our end of a socket pair the accepting shard made for us; the stream owns
            // it now.
            let stream = unsafe { UnixStream::from_raw_fd(fd.into_raw_fd()) };
            if let Some(c) = connect {
                let (r, w) = futures_lite::io::split(stream);
                Box::pin(serve(shard, r, w, c, buf, None, client)).await;
            }
        }
    }
    drop(guard);
}
