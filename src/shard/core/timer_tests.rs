//! Will and expiry timers across reconnects.

use super::tests_support::{connect_to, connect_v5, core};
use super::*;

fn session_of(c: &mut Core, id: &str, clean: bool, expiry: u32, now: Instant) -> ConnCtx {
    connect_to(c, &connect_v5(id, clean, Some(expiry)), now).0
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
