//! A session's connection: acknowledgements held until what they acknowledge is durable
//! (released in PUBLISH order), and its construction.

use super::*;

/// An acknowledgement held until what it acknowledges is stored.
#[derive(Debug)]
pub(super) struct HeldAck {
    token: u64,
    /// `None`: withheld for good (the store failed and the client speaks MQTT 3.x).
    packet: Option<Packet>,
    ready: bool,
    qos1: bool,
}

impl Link {
    /// Sends `packet` now, or after the acknowledgements held before it.
    pub fn send_ack(&mut self, packet: Packet) {
        if self.held_acks.is_empty() {
            self.out.send(&packet);
        } else {
            self.held_acks.push_back(HeldAck {
                token: 0,
                packet: Some(packet),
                ready: true,
                qos1: false,
            });
        }
    }

    /// Holds `packet` until [`Link::release_ack`] is called with `token`.
    pub fn hold_ack(&mut self, token: u64, packet: Packet) {
        let qos1 = matches!(packet, Packet::PubAck(_));
        self.held_acks.push_back(HeldAck {
            token,
            packet: Some(packet),
            ready: false,
            qos1,
        });
    }

    /// Marks the acknowledgement of `token` ready and sends every ready one at the front.
    /// When what it acknowledges was refused (`Some(reason)`: not stored, or not kept), an
    /// MQTT 5 client gets the acknowledgement with that reason and an MQTT 3.x client none
    /// (it will resend).
    pub fn release_ack(&mut self, token: u64, refused: Option<shardmq_protocol::ReasonCode>) {
        let v5 = self.version.is_v5();
        if let Some(h) = self
            .held_acks
            .iter_mut()
            .find(|h| h.token == token && !h.ready)
        {
            h.ready = true;
            if let Some(reason) = refused {
                h.packet = match h.packet.take() {
                    Some(Packet::PubAck(a)) if v5 => {
                        Some(Packet::PubAck(Ack::with_reason(a.packet_id, reason)))
                    }
                    Some(Packet::PubRec(a)) if v5 => {
                        Some(Packet::PubRec(Ack::with_reason(a.packet_id, reason)))
                    }
                    Some(Packet::PubAck(_)) | Some(Packet::PubRec(_)) => None,
                    other => other,
                };
            }
        }
        self.send_ready_acks();
    }

    /// Withholds the acknowledgement of `token` for good and sends the ready ones before
    /// it: the connection is closing, and the client will publish the message again (DUP,
    /// same packet id) when it reconnects to its session.
    pub fn withhold_ack(&mut self, token: u64) {
        if let Some(h) = self
            .held_acks
            .iter_mut()
            .find(|h| h.token == token && !h.ready)
        {
            h.ready = true;
            h.packet = None;
        }
        self.send_ready_acks();
    }

    /// Sends every ready acknowledgement at the front of the held ones.
    fn send_ready_acks(&mut self) {
        while let Some(h) = self.held_acks.pop_front() {
            if !h.ready {
                self.held_acks.push_front(h);
                break;
            }
            if let Some(p) = h.packet {
                self.out.send(&p);
            }
        }
    }

    /// QoS 1 publishes whose PUBACK is held: they count against our Receive Maximum.
    pub fn held_qos1(&self) -> usize {
        self.held_acks.iter().filter(|h| h.qos1 && !h.ready).count()
    }
}

impl Link {
    pub fn new(
        conn_id: u64,
        out: Rc<Outbound>,
        receive_maximum: u16,
        max_packet_bytes: u32,
        topic_alias_max: u16,
    ) -> Link {
        Link {
            conn_id,
            version: out.version(),
            out,
            receive_maximum,
            max_packet_bytes,
            topic_alias_max,
            aliases: HashMap::new(),
            held_acks: VecDeque::new(),
            peer: None,
            keep_alive_s: 0,
        }
    }
}
