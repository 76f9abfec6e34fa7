//! Logins: failures, certificate identities, slow hashes off the executor.

use super::tests_support::*;
use super::*;
use crate::auth::PasswordFile;

fn connect_with(user: &str, password: &[u8]) -> Connect {
    Connect {
        username: Some(MqttStr::new(user).unwrap()),
        password: Some(bytes::Bytes::copy_from_slice(password)),
        ..connect_v5("cid", true, None)
    }
}

#[test]
fn failed_logins_are_counted_and_answered_with_connack_only() {
    let mut c = core();
    let pw = PasswordFile::parse(include_str!("../../../tests/fixtures/auth/passwd"), "p").unwrap();
    c.set_auth(Arc::new(Auth::new(false, Some(pw), None, vec![])));
    let now = Instant::now();
    // sha512user's $6$ hash is fast: decided on the spot.
    for (password, ok) in [(&b"wrong"[..], false), (b"sha512 secret", true)] {
        let connect = connect_with("sha512user", password);
        let LoginStep::Done(login) = c.check_login(&connect, None, None) else {
            panic!("a $6$ hash is checked inline");
        };
        let out = Rc::new(Outbound::new(ProtocolVersion::V5));
        let r = c.connect_as(&connect, None, login, out.clone(), now);
        let got = drain(&out);
        assert_eq!(r.is_ok(), ok);
        match &got[..] {
            [Packet::ConnAck(a)] if !ok => {
                assert_eq!(a.reason_code, ReasonCode::BadUserNameOrPassword)
            }
            [Packet::ConnAck(a)] => assert_eq!(a.reason_code, ReasonCode::Success),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(c.stats.logins_failed, 1);
    // alice's $7$ (101 iterations) is fast too; a wrong one counts again.
    let connect = connect_with("alice", b"x");
    let LoginStep::Done(login) = c.check_login(&connect, None, None) else {
        panic!("101 PBKDF2 iterations are checked inline");
    };
    let out = Rc::new(Outbound::new(ProtocolVersion::V5));
    assert!(c.connect_as(&connect, None, login, out, now).is_err());
    assert_eq!(c.stats.logins_failed, 2);
    // Anonymous refused.
    let mut anon = connect_with("x", b"");
    anon.username = None;
    anon.password = None;
    let LoginStep::Done(login) = c.check_login(&anon, None, None) else {
        panic!("no password to check");
    };
    assert_eq!(login.refused, Some(LoginFailure::Anonymous));
}

#[test]
fn a_certificate_identity_is_the_user_name_without_a_password() {
    let mut c = core();
    let pw = PasswordFile::parse(include_str!("../../../tests/fixtures/auth/passwd"), "p").unwrap();
    let acl = crate::auth::Acl::parse("user CN=dev1\ntopic readwrite dev1/#\n", "a").unwrap();
    c.set_auth(Arc::new(Auth::new(false, Some(pw), Some(acl), vec![])));
    let mut connect = connect_with("ignored", b"");
    connect.username = None;
    connect.password = None;
    let LoginStep::Done(login) = c.check_login(&connect, Some("CN=dev1"), None) else {
        panic!("nothing to verify");
    };
    assert_eq!(login.refused, None);
    let out = Rc::new(Outbound::new(ProtocolVersion::V5));
    let mut ctx = c
        .connect_as(&connect, None, login, out.clone(), Instant::now())
        .unwrap()
        .ctx;
    assert_eq!(ctx.username.as_ref().map(|u| u.as_str()), Some("CN=dev1"));
    let publish = |t: &str| {
        let mut p = Publish::new(TopicName::new(t).unwrap(), bytes::Bytes::from_static(b"x"));
        p.qos = QoS::AtLeastOnce;
        p.packet_id = crate::protocol::PacketId::new(1);
        Packet::Publish(p)
    };
    c.on_packet(&mut ctx, publish("other/t"), Instant::now())
        .unwrap();
    c.on_packet(&mut ctx, publish("dev1/t"), Instant::now())
        .unwrap();
    let acks: Vec<ReasonCode> = drain(&out)
        .into_iter()
        .filter_map(|p| match p {
            Packet::PubAck(a) => Some(a.reason_code),
            _ => None,
        })
        .collect();
    assert_eq!(
        acks,
        vec![ReasonCode::NotAuthorized, ReasonCode::NoMatchingSubscribers]
    );
}

#[test]
fn slow_hashes_go_off_the_executor_within_a_bound() {
    // The login state alone, without a shard core around it.
    let cfg = Config::default();
    let mut c = Logins::new(&cfg);
    let phc = crate::auth::password::hash_argon2id(b"pw").unwrap();
    let pw = PasswordFile::parse(&format!("u:{phc}\n"), "p").unwrap();
    let auth = Arc::new(Auth::new(false, Some(pw), None, vec![]));
    c.set_auth(auth.clone());
    let max = cfg.auth.verifications_inflight_max;
    let mut pending = Vec::new();
    for _ in 0..max {
        match c.check(&connect_with("u", b"bad"), None, None) {
            LoginStep::Verify(v) => pending.push(v),
            LoginStep::Done(l) => panic!("{l:?}"),
        }
    }
    // One more: refused as busy rather than queued without bound.
    match c.check(&connect_with("u", b"bad"), None, None) {
        LoginStep::Done(l) => assert_eq!(l.refused, Some(LoginFailure::Busy)),
        LoginStep::Verify(_) => panic!("beyond verifications_inflight_max"),
    }
    for v in pending {
        let ok = v.run();
        assert!(c.finish(v, ok).refused.is_some());
    }
    // The right password, verified once, is then remembered.
    let LoginStep::Verify(v) = c.check(&connect_with("u", b"pw"), None, None) else {
        panic!("first login verifies");
    };
    let ok = v.run();
    assert!(c.finish(v, ok).refused.is_none());
    assert!(matches!(
        c.check(&connect_with("u", b"pw"), None, None),
        LoginStep::Done(Login { refused: None, .. })
    ));
    // New rules (a reload) forget what was verified under the old ones.
    c.set_auth(auth);
    assert!(matches!(
        c.check(&connect_with("u", b"pw"), None, None),
        LoginStep::Verify(_)
    ));
}
