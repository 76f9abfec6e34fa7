//! SUBSCRIBE bursts on one shard.

use super::tests_support::*;
use super::*;
use crate::protocol::PacketId;

#[test]
fn two_subscribes_in_a_row_both_take_effect() {
    let mut c = core();
    let now = Instant::now();
    let (mut sub, sub_out) = conn(&mut c, "s", now);
    for (pid, f) in [(1u16, "TopicA/B"), (2, "Topic/C")] {
        let p = Packet::Subscribe(Subscribe {
            packet_id: PacketId::new(pid).unwrap(),
            properties: Default::default(),
            filters: vec![(
                TopicFilter::new(f).unwrap(),
                SubscriptionOptions {
                    qos: QoS::ExactlyOnce,
                    ..Default::default()
                },
            )],
        });
        c.on_packet(&mut sub, p, now).unwrap();
    }
    let (mut publ, _) = conn(&mut c, "p", now);
    let p = Packet::Publish(Publish::new(
        TopicName::new("TopicA/B").unwrap(),
        bytes::Bytes::from_static(b"one"),
    ));
    c.on_packet(&mut publ, p, now).unwrap();
    let got = drain(&sub_out);
    assert!(
        got.iter().any(|p| matches!(p, Packet::Publish(_))),
        "{got:?}"
    );
}
