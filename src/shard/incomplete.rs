//! The shard's share of the broker-wide budget for bytes held in packets that have started
//! to arrive and are not complete yet (`limits.incomplete_packet_bytes_max`, split evenly
//! between the shards). A client that announces a large packet and sends it slowly, or not
//! at all, holds a read buffer sized for the packet it announced; many such clients could
//! hold the broker's memory without bound. Each connection reports the buffer it holds for
//! an incomplete packet after every read (a buffer that grew for an earlier, bigger packet
//! is first shrunk to the one under way); when the shard's total passes its share (at
//! least one whole packet), the largest holders are closed first (MQTT 5: DISCONNECT 0x97
//! Quota exceeded) until it is back under. The time limit on a started packet
//! (`limits.packet_timeout_s`) is the reader's.

use hashbrown::HashMap;
use std::cell::{Cell, RefCell};
use std::rc::Rc;

use crate::protocol::ReasonCode;
use crate::session::Outbound;

#[derive(Debug)]
pub struct IncompletePackets {
    max_bytes: u64,
    held: Cell<u64>,
    /// Connection id -> bytes held, and its outbound (to close it).
    holders: RefCell<HashMap<u64, (u64, Rc<Outbound>)>>,
    /// Connections closed for the budget.
    pub closed: Cell<u64>,
    /// Connections closed because a started packet did not complete in time.
    pub timed_out: Cell<u64>,
}

impl IncompletePackets {
    pub fn new(max_bytes: u64) -> IncompletePackets {
        IncompletePackets {
            max_bytes,
            held: Cell::new(0),
            holders: RefCell::new(HashMap::new()),
            closed: Cell::new(0),
            timed_out: Cell::new(0),
        }
    }

    /// Bytes held in incomplete packets on this shard.
    pub fn held(&self) -> u64 {
        self.held.get()
    }

    /// Connection `conn_id` now holds `bytes` for an incomplete packet (0: none, or it
    /// ended). Closes the largest holders while the shard is over its share.
    pub fn update(&self, conn_id: u64, bytes: u64, out: &Rc<Outbound>) {
        // A connection being closed (this budget's verdict, or any other) is on its way
        // out: it is not counted again.
        let bytes = if out.is_closed() { 0 } else { bytes };
        let mut holders = self.holders.borrow_mut();
        let before = match bytes {
            0 => holders.remove(&conn_id).map_or(0, |(b, _)| b),
            _ => holders
                .insert(conn_id, (bytes, out.clone()))
                .map_or(0, |(b, _)| b),
        };
        let mut held = self.held.get() - before + bytes;
        while held > self.max_bytes {
            let Some((&id, _)) = holders.iter().max_by_key(|(_, (b, _))| *b) else {
                break;
            };
            let Some((b, o)) = holders.remove(&id) else {
                break;
            };
            held -= b;
            self.closed.set(self.closed.get() + 1);
            // Counted in /metrics; a line each only at debug (a flood of hoarders would
            // otherwise flood the log too).
            tracing::debug!(
                bytes = b,
                held,
                "connection closed: the largest holder of incomplete packets while over limits.incomplete_packet_bytes_max"
            );
            o.close(Some(ReasonCode::QuotaExceeded));
        }
        self.held.set(held);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ProtocolVersion;

    #[test]
    fn the_largest_holders_are_closed_first_until_under_the_share() {
        let p = IncompletePackets::new(100);
        let outs: Vec<Rc<Outbound>> = (0..4)
            .map(|_| Rc::new(Outbound::new(ProtocolVersion::V5)))
            .collect();
        p.update(0, 30, &outs[0]);
        p.update(1, 50, &outs[1]);
        p.update(2, 10, &outs[2]);
        assert_eq!(p.held(), 90);
        assert!(outs.iter().all(|o| !o.is_closed()));
        // 90 + 40 = 130: the 50 goes (80 left, under 100).
        p.update(3, 40, &outs[3]);
        assert!(outs[1].is_closed());
        assert!(!outs[0].is_closed() && !outs[2].is_closed() && !outs[3].is_closed());
        assert_eq!(p.held(), 80);
        // A holder that completes its packet gives its bytes back.
        p.update(3, 0, &outs[3]);
        assert_eq!(p.held(), 40);
        // The closed one reading more is not counted (nor closed) again.
        p.update(1, 60, &outs[1]);
        assert_eq!(p.held(), 40);
        assert_eq!(p.closed.get(), 1);
    }
}
