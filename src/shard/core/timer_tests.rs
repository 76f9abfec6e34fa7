//! Will and expiry timers across reconnects.

use super::tests_support::core;
use super::*;
use crate::protocol::ConnectProperties;

fn connect(id: &str, clean_start: bool, expiry: u32) -> Connect {
    Connect {
        protocol: ProtocolVersion::V5,
        clean_start,
        keep_alive: 0,
        properties: ConnectProperties {
            session_expiry_interval: Some(expiry),
            ..Default::default()
        },
        client_id: MqttStr::new(id).unwrap(),
        will: None,
        username: None,
        password: None,
    }
}

fn session_of(c: &mut Core, id: &str, clean: bool, expiry: u32, now: Instant) -> ConnCtx {
    let out = Rc::new(Outbound::new(ProtocolVersion::V5));
    c.connect(&connect(id, clean, expiry), None, out, now)
        .unwrap()
        .ctx
}

#[test]
fn a_stale_expiry_timer_does_not_expire_a_new_session_with_the_same_id() {
    let mut c = core();
    let t0 = Instant::now();
    let ctx = session_of(&mut c, "x", true, 5, t0);
    c.disconnected(&ctx, Ending::Normal, t0); // expiry timer at t0 + 5
    let ctx = session_of(&mut c, "x", true, 10, t0 + Duration::from_secs(1));
    c.disconnected(&ctx, Ending::Normal, t0 + Duration::from_secs(1));
    c.fire_timers(t0 + Duration::from_secs(6));
    assert!(c.session(&MqttStr::new("x").unwrap()).is_some());
    c.fire_timers(t0 + Duration::from_secs(11));
    assert!(c.session(&MqttStr::new("x").unwrap()).is_none());
}
