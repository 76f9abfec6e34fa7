//! The bytes waiting to be written to one connection. Sessions and the shard append encoded
//! packets; the connection's writer task takes everything at once and writes it in one go,
//! so many small packets cost one write. No I/O here: appending wakes the writer.
//!
//! Flow control: [`Outbound::pending_bytes`] counts what is buffered plus what the writer
//! took and has not written yet, which is what sessions compare with
//! `limits.outbound_buffer_bytes_max`. A session that held messages back for want of room
//! marks the buffer [starved](Outbound::mark_starved); the writer reports its progress
//! ([`Outbound::wrote`]) and, when the mark is set, asks the shard to move queued messages
//! in. The connection's reader waits for [room](Outbound::room) before it reads more from a
//! client whose own answers pile up unread.

use bytes::BytesMut;
use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::task::{Poll, Waker};

use shardmq_protocol::{Packet, ProtocolVersion, ReasonCode};

/// Why a connection is being closed by the broker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CloseRequest {
    /// Sent in a DISCONNECT first (MQTT 5 only), when set.
    pub reason: Option<ReasonCode>,
}

/// One connection's outgoing buffer and its writer's waker.
pub struct Outbound {
    buf: RefCell<BytesMut>,
    waker: Cell<Option<Waker>>,
    /// Set when the broker wants the connection closed (takeover, admin, shutdown); the
    /// reader stops and the writer flushes what is buffered, then closes.
    close: Cell<Option<CloseRequest>>,
    close_waker: Cell<Option<Waker>>,
    version: ProtocolVersion,
    /// Bytes the writer took with its last batch and has not written yet.
    writing: Cell<usize>,
    /// A session held messages back because this buffer was full.
    starved: Cell<bool>,
    /// The reader waiting for the buffer to drain below a mark.
    room_waker: Cell<Option<Waker>>,
}

impl std::fmt::Debug for Outbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbound")
            .field("buffered", &self.len())
            .field("writing", &self.writing.get())
            .field("close", &self.close.get())
            .field("version", &self.version)
            .finish()
    }
}

impl Outbound {
    pub fn new(version: ProtocolVersion) -> Outbound {
        Outbound {
            // Allocated on the first packet and given back when idle (see the writer).
            buf: RefCell::new(BytesMut::new()),
            waker: Cell::new(None),
            close: Cell::new(None),
            close_waker: Cell::new(None),
            version,
            writing: Cell::new(0),
            starved: Cell::new(false),
            room_waker: Cell::new(None),
        }
    }

    /// Bytes waiting to reach the socket: buffered, plus taken by the writer and not yet
    /// written. What the outbound cap limits.
    pub fn pending_bytes(&self) -> usize {
        self.len() + self.writing.get()
    }

    /// The writer wrote `n` bytes of its batch.
    pub fn wrote(&self, n: usize) {
        self.writing.set(self.writing.get().saturating_sub(n));
        if let Some(w) = self.room_waker.take() {
            w.wake();
        }
    }

    /// A session held messages back because the buffer was full: they are to be moved in
    /// once the writer makes room.
    pub fn mark_starved(&self) {
        self.starved.set(true);
    }

    /// Takes the starved mark (the writer, after making room).
    pub fn take_starved(&self) -> bool {
        self.starved.replace(false)
    }

    /// Completes once fewer than `mark` bytes are pending or the connection is closing.
    pub async fn room(&self, mark: usize) {
        poll_fn(|cx| {
            if self.pending_bytes() < mark || self.close.get().is_some() {
                return Poll::Ready(());
            }
            self.room_waker.set(Some(cx.waker().clone()));
            Poll::Pending
        })
        .await
    }

    pub fn version(&self) -> ProtocolVersion {
        self.version
    }

    /// Bytes buffered and not yet taken by the writer.
    pub fn len(&self) -> usize {
        self.buf.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Gives back the buffer's memory when it is empty and larger than `keep_bytes`.
    pub fn shrink_if_empty(&self, keep_bytes: usize) {
        let mut buf = self.buf.borrow_mut();
        if buf.is_empty() && buf.capacity() > keep_bytes {
            *buf = BytesMut::new();
        }
    }

    /// Appends an encoded packet. Encoding cannot fail for packets the broker builds within
    /// the protocol's size limit; one that would is dropped and reported.
    pub fn send(&self, packet: &Packet) -> bool {
        let ok = packet
            .encode(self.version, &mut self.buf.borrow_mut())
            .is_ok();
        self.wake();
        ok
    }

    /// Appends bytes already encoded for this connection's version.
    pub fn send_with(&self, f: impl FnOnce(&mut BytesMut)) {
        f(&mut self.buf.borrow_mut());
        self.wake();
    }

    fn wake(&self) {
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    /// Waits until there is something to write or the connection is to be closed, then
    /// takes the buffered bytes and whether to close after writing them. Reuses `spare` as
    /// the next buffer. Asking for a batch means the previous one was written; the new one
    /// counts as pending until [`Outbound::wrote`] says otherwise.
    pub async fn next_batch(&self, spare: BytesMut) -> (BytesMut, bool) {
        let mut spare = Some(spare);
        poll_fn(|cx| {
            let closing = self.close.get().is_some();
            let mut buf = self.buf.borrow_mut();
            if !buf.is_empty() || closing {
                let mut next = spare.take().unwrap_or_default();
                next.clear();
                let out = std::mem::replace(&mut *buf, next);
                self.writing.set(out.len());
                return Poll::Ready((out, closing));
            }
            self.waker.set(Some(cx.waker().clone()));
            Poll::Pending
        })
        .await
    }

    /// Asks for the connection to be closed after what is buffered is written. The first
    /// request wins. With a reason and MQTT 5, a DISCONNECT is appended first.
    pub fn close(&self, reason: Option<ReasonCode>) {
        if self.close.get().is_some() {
            return;
        }
        if let (Some(r), true) = (reason, self.version.is_v5()) {
            self.send(&Packet::Disconnect(shardmq_protocol::Disconnect::new(r)));
        }
        self.close.set(Some(CloseRequest { reason }));
        self.wake();
        if let Some(w) = self.close_waker.take() {
            w.wake();
        }
        if let Some(w) = self.room_waker.take() {
            w.wake();
        }
    }

    /// Whether [`Outbound::close`] has been called.
    pub fn is_closed(&self) -> bool {
        self.close.get().is_some()
    }

    /// Completes when [`Outbound::close`] has been called (the reader selects on it).
    pub async fn closed(&self) -> CloseRequest {
        poll_fn(|cx| match self.close.get() {
            Some(r) => Poll::Ready(r),
            None => {
                self.close_waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
        .await
    }
}
