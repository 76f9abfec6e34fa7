//! The admin endpoint over real HTTP: every API answer, the Prometheus metrics (parsed
//! strictly), counters moved by real MQTT traffic, DELETE of an online session, the
//! dashboard driven in headless Chromium, search, kick and rates over the API, and the
//! `$SYS` topics.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests and benchmarks: a failure is the test's failure"
)]

mod support;

use support::browser::{js, wait_js};

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;
use shardmq::protocol::{Packet, QoS, ReasonCode};
use support::raw::{ConnectOpts, RawClient};
use support::{id_on_shard, TestBroker, TIMEOUT};

const SHARDS: usize = 2;

fn admin(b: &TestBroker) -> SocketAddr {
    b.admin.expect("the ready line names the admin endpoint")
}

fn get(b: &TestBroker, path: &str) -> (u16, String) {
    b.http("GET", path)
}

fn get_json(b: &TestBroker, path: &str) -> Value {
    b.admin_json(path)
}

/// An offline persistent session subscribed to `topic`, offered `queued` QoS 1 messages by a
/// 3.1.1 publisher (each acknowledged; queued as far as the session's limits allow).
fn offline_session_with_queue(b: &TestBroker, client_id: &str, topic: &str, queued: usize) {
    let (mut c, _) = RawClient::connect(b.addr, &ConnectOpts::v311(client_id, false));
    c.sub(&[(topic, QoS::AtLeastOnce)]);
    c.disconnect();
    let mut p = RawClient::connect_v311(b.addr, &format!("{client_id}-publisher"));
    for i in 0..queued {
        p.publish(topic, format!("m{i}").as_bytes(), QoS::AtLeastOnce, false);
    }
    p.disconnect();
}

#[test]
fn every_api_endpoint_answers_over_http() {
    let b = TestBroker::start_with(SHARDS, "[sys]\ninterval_s = 0\n");
    let id = id_on_shard("api-sess", 1, SHARDS);
    offline_session_with_queue(&b, &id, "api/queue", 3);
    let mut r = RawClient::connect_v311(b.addr, "api-retainer");
    r.publish("api/retained/one", b"kept", QoS::AtLeastOnce, true);
    r.disconnect();

    let shards = get_json(&b, "/api/shards");
    let list = shards["shards"].as_array().expect("shards");
    assert_eq!(list.len(), SHARDS);
    for (i, s) in list.iter().enumerate() {
        assert_eq!(s["shard"], i);
        for k in [
            "core",
            "connections",
            "sessions",
            "queued_messages",
            "received_per_s",
            "sent_per_s",
            "storage_bytes",
        ] {
            assert!(s.get(k).is_some(), "shard field {k}: {s}");
        }
    }
    assert_eq!(list[1]["queued_messages"], 3, "{shards}");
    assert!(list[1]["storage_bytes"].as_u64().unwrap() > 0, "{shards}");
    // What the files take on disk (as du counts), not the journal's preallocated 64 MiB.
    assert!(
        list[1]["storage_bytes"].as_u64().unwrap() < 16 << 20,
        "{shards}"
    );

    let sessions = get_json(&b, "/api/sessions");
    let mine = sessions["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["client_id"] == id.as_str())
        .unwrap_or_else(|| panic!("{id} listed: {sessions}"))
        .clone();
    assert_eq!(mine["shard"], 1);
    assert_eq!(mine["online"], false);
    assert_eq!(mine["protocol"], "3.1.1");
    assert_eq!(mine["queued_messages"], 3);
    assert!(mine["queued_bytes"].as_u64().unwrap() > 0);
    assert_eq!(mine["subscriptions"][0]["filter"], "api/queue");
    assert_eq!(mine["subscriptions"][0]["qos"], 1);
    assert!(mine.get("expiry_s").is_some());

    let one = get_json(&b, &format!("/api/sessions/{id}"));
    assert_eq!(one, mine);
    let (status, body) = get(&b, "/api/sessions/no-such-client");
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("error"), "{body}");

    let subs = get_json(&b, "/api/subscriptions");
    assert!(
        subs["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["filter"] == "api/queue" && s["client_id"] == id.as_str()),
        "{subs}"
    );
    let retained = get_json(&b, "/api/retained");
    assert_eq!(retained["total"], 1, "{retained}");
    assert_eq!(retained["items"][0]["topic"], "api/retained/one");
    assert_eq!(retained["items"][0]["payload_preview"], "kept");

    let (status, body) = get(&b, "/api/sessions?limit=0");
    assert_eq!(status, 400, "{body}");
    let (status, _) = get(&b, "/api/sessions?limit=100000");
    assert_eq!(status, 400);
    let (status, _) = get(&b, "/api/nothing-here");
    assert_eq!(status, 404);
}

#[test]
fn listings_are_paged_with_a_cursor_over_every_shard() {
    let b = TestBroker::start_with(3, "[sys]\ninterval_s = 0\n");
    let mut ids: Vec<String> = (0..7).map(|i| format!("page-{i}")).collect();
    let _clients: Vec<RawClient> = ids
        .iter()
        .map(|id| {
            let mut c = RawClient::connect_v311(b.addr, id);
            c.sub(&[(&format!("page/{id}"), QoS::AtMostOnce)]);
            c
        })
        .collect();
    ids.sort();
    let mut seen = Vec::new();
    let mut path = "/api/sessions?limit=3".to_string();
    let mut pages = 0;
    loop {
        let page = get_json(&b, &path);
        assert_eq!(page["total"], 7);
        let items = page["items"].as_array().unwrap();
        assert!(items.len() <= 3);
        seen.extend(
            items
                .iter()
                .map(|s| s["client_id"].as_str().unwrap().to_string()),
        );
        pages += 1;
        match page["next"].as_str() {
            Some(next) => path = format!("/api/sessions?limit=3&after={next}"),
            None => break,
        }
    }
    assert_eq!(seen, ids);
    assert_eq!(pages, 3);

    let mut filters = Vec::new();
    let mut path = "/api/subscriptions?limit=4".to_string();
    loop {
        let page = get_json(&b, &path);
        let items = page["items"].as_array().unwrap();
        filters.extend(
            items
                .iter()
                .map(|s| s["filter"].as_str().unwrap().to_string()),
        );
        match page.get("next").filter(|n| !n.is_null()) {
            Some(n) => {
                path = format!(
                    "/api/subscriptions?limit=4&after_filter={}&after_client={}",
                    n["after_filter"].as_str().unwrap(),
                    n["after_client"].as_str().unwrap()
                )
            }
            None => break,
        }
    }
    let want: Vec<String> = ids.iter().map(|id| format!("page/{id}")).collect();
    assert_eq!(filters, want);
}

// ------------------------------------------------------------------------------ metrics

/// A strict reading of the Prometheus text format 0.0.4: every sample belongs to a family
/// declared once with `# TYPE` before it, families are contiguous, names and labels are
/// well formed, values parse, every sample has a `shard` label, and histogram buckets are
/// cumulative up to `+Inf` = `_count`. Returns `series -> value`.
fn parse_prometheus(text: &str) -> BTreeMap<String, f64> {
    fn valid_name(n: &str) -> bool {
        let mut cs = n.chars();
        matches!(cs.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
            && cs.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }
    fn parse_labels(s: &str) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut rest = s;
        while !rest.is_empty() {
            let (name, after) = rest.split_once("=\"").expect("label=\"value\"");
            assert!(
                valid_name(name) && !name.starts_with("__"),
                "label name {name:?}"
            );
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                match chars.next().expect("closing quote") {
                    (_, '\\') => match chars.next().expect("escape").1 {
                        'n' => value.push('\n'),
                        c @ ('\\' | '"') => value.push(c),
                        c => panic!("bad escape \\{c}"),
                    },
                    (i, '"') => break i,
                    (_, c) => value.push(c),
                }
            };
            out.push((name.to_string(), value));
            rest = &after[end + 1..];
            rest = rest.strip_prefix(',').unwrap_or(rest);
        }
        out
    }
    let mut types: HashMap<String, String> = HashMap::new();
    let mut closed: HashSet<String> = HashSet::new();
    let mut current: Option<String> = None;
    let mut samples = BTreeMap::new();
    let mut buckets: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    assert!(text.ends_with('\n'), "the text ends with a newline");
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let kind = parts.next().unwrap();
            let name = parts.next().expect("metric name").to_string();
            assert!(valid_name(&name), "{line}");
            if kind == "TYPE" {
                let t = parts.next().expect("type");
                assert!(
                    ["counter", "gauge", "histogram", "summary", "untyped"].contains(&t),
                    "{line}"
                );
                assert!(
                    types.insert(name.clone(), t.into()).is_none(),
                    "TYPE twice: {line}"
                );
                if let Some(prev) = current.replace(name) {
                    closed.insert(prev);
                }
            }
            continue;
        }
        assert!(
            !line.starts_with('#') && !line.trim().is_empty(),
            "{line:?}"
        );
        let (series, value) = line.rsplit_once(' ').expect("series and value");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("value in {line}")),
        };
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (n, parse_labels(l.strip_suffix('}').expect("closing brace"))),
            None => (series, Vec::new()),
        };
        assert!(valid_name(name), "{line}");
        let family = types
            .keys()
            .find(|f| {
                name == f.as_str()
                    || (types[*f] == "histogram"
                        && ["_bucket", "_sum", "_count"]
                            .iter()
                            .any(|s| name.strip_suffix(s) == Some(f.as_str())))
            })
            .unwrap_or_else(|| panic!("no TYPE before {line}"))
            .clone();
        assert_eq!(
            current.as_deref(),
            Some(family.as_str()),
            "family not contiguous: {line}"
        );
        assert!(!closed.contains(&family));
        // Every shardmq series is per shard; the process-wide ones are the standard
        // `process_*` series and the build info.
        let process_wide = name.starts_with("process_") || name == "shardmq_build_info";
        assert!(
            process_wide
                || labels
                    .iter()
                    .any(|(k, v)| k == "shard" && v.parse::<usize>().is_ok()),
            "shard label: {line}"
        );
        if types[&family] == "counter" {
            assert!(value >= 0.0, "{line}");
        }
        if name.ends_with("_bucket") {
            let le = &labels.iter().find(|(k, _)| k == "le").expect("le").1;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap()
            };
            let key: Vec<String> = labels
                .iter()
                .filter(|(k, _)| k != "le")
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            buckets
                .entry(format!("{name}{key:?}"))
                .or_default()
                .push((le, value));
        }
        assert!(
            samples.insert(series.to_string(), value).is_none(),
            "series twice: {line}"
        );
    }
    for (series, b) in &buckets {
        assert!(
            b.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
            "{series}: {b:?}"
        );
        assert_eq!(b.last().unwrap().0, f64::INFINITY, "{series}");
    }
    samples
}

/// The sum over shards (and other labels) of a metric's samples.
fn total(samples: &BTreeMap<String, f64>, name: &str, with: &str) -> f64 {
    samples
        .iter()
        .filter(|(s, _)| s.split('{').next() == Some(name) && s.contains(with))
        .map(|(_, v)| v)
        .sum()
}

fn scrape(b: &TestBroker) -> BTreeMap<String, f64> {
    let url = format!("http://{}/metrics", admin(b));
    let r = ureq::get(&url)
        .timeout(TIMEOUT)
        .call()
        .expect("GET /metrics");
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    parse_prometheus(&r.into_string().expect("body"))
}

#[test]
fn metrics_parse_as_prometheus_text_and_move_with_traffic() {
    let b = TestBroker::start_with(SHARDS, "[sys]\ninterval_s = 0\n");
    let before = scrape(&b);
    // The standard process series, as the broker's own /proc figures give them.
    let rss = before["process_resident_memory_bytes"];
    let own = b.rss_kib() as f64 * 1024.0;
    assert!(rss > 0.5 * own && rss < 2.0 * own, "{rss} vs VmRSS {own}");
    assert!(before["process_open_fds"] >= 3.0);
    assert!(before["process_max_fds"] >= before["process_open_fds"]);
    assert!(before["process_cpu_seconds_total"] >= 0.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let started = before["process_start_time_seconds"];
    assert!(started <= now && started > now - 600.0, "{started}");
    assert_eq!(
        before[&format!(
            "shardmq_build_info{{version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        )],
        1.0
    );
    for name in [
        "shardmq_connections",
        "shardmq_sessions",
        "shardmq_messages_received_total",
        "shardmq_messages_sent_total",
        "shardmq_messages_dropped_total",
        "shardmq_queued_messages",
        "shardmq_bytes_received_total",
        "shardmq_bytes_sent_total",
        "shardmq_cross_shard_messages_sent_total",
        "shardmq_storage_write_seconds_count",
        "shardmq_storage_fsync_seconds_count",
    ] {
        for shard in 0..SHARDS {
            assert!(
                before
                    .keys()
                    .any(|k| k.starts_with(&format!("{name}{{shard=\"{shard}\""))),
                "{name} for shard {shard}"
            );
        }
    }
    for reason in [
        "queue_full_reject_newest",
        "queue_full_drop_oldest",
        "storage_budget_full",
        "message_expired",
        "qos0_offline_disabled",
        "retained_store_full",
        "shared_group_without_member",
        "outbound_buffer_full",
    ] {
        assert!(
            before.contains_key(&format!(
                "shardmq_messages_dropped_total{{shard=\"0\",reason=\"{reason}\"}}"
            )),
            "drop reason {reason}"
        );
    }

    // A persistent subscriber on shard 1, publishers on both shards: messages cross shards,
    // are stored (write + fsync), sent at QoS 1, and some are received at QoS 2.
    let sub_id = id_on_shard("metrics-sub", 1, SHARDS);
    let (mut sub, _) = RawClient::connect(b.addr, &ConnectOpts::v311(&sub_id, false));
    sub.sub(&[("metrics/t", QoS::AtLeastOnce)]);
    let pub_id = id_on_shard("metrics-pub", 0, SHARDS);
    let mut p = RawClient::connect_v311(b.addr, &pub_id);
    for i in 0..5 {
        p.publish(
            "metrics/t",
            format!("{i}").as_bytes(),
            QoS::AtLeastOnce,
            false,
        );
    }
    p.publish("metrics/t", b"two", QoS::ExactlyOnce, false);
    for _ in 0..6 {
        sub.recv_publish_ack();
    }
    sub.ping();
    let after = scrape(&b);
    let moved = |name: &str, with: &str| total(&after, name, with) - total(&before, name, with);
    assert_eq!(moved("shardmq_messages_received_total", "qos=\"1\""), 5.0);
    assert_eq!(moved("shardmq_messages_received_total", "qos=\"2\""), 1.0);
    assert_eq!(moved("shardmq_messages_sent_total", "qos=\"1\""), 6.0);
    assert!(moved("shardmq_cross_shard_messages_sent_total", "") >= 6.0);
    assert!(moved("shardmq_bytes_received_total", "") > 0.0);
    assert!(moved("shardmq_bytes_sent_total", "") > 0.0);
    assert!(moved("shardmq_storage_write_seconds_count", "") > 0.0);
    assert!(moved("shardmq_storage_fsync_seconds_count", "") > 0.0);
    assert_eq!(total(&after, "shardmq_sessions", ""), 2.0);
    assert_eq!(total(&after, "shardmq_clients_connected", ""), 2.0);
    assert_eq!(
        after["shardmq_clients_connected{shard=\"1\"}"], 1.0,
        "the subscriber lives on shard 1"
    );

    // A drop: QoS 0 to an offline session with queue_qos0_offline = false is counted.
    drop(b);
    let b = TestBroker::start_with(
        SHARDS,
        "[sys]\ninterval_s = 0\n[sessions]\nqueue_qos0_offline = false\n",
    );
    let (mut c, _) = RawClient::connect(b.addr, &ConnectOpts::v311("drop-sub", false));
    c.sub(&[("drop/t", QoS::AtLeastOnce)]);
    c.disconnect();
    let mut p = RawClient::connect_v311(b.addr, "drop-pub");
    p.publish("drop/t", b"lost", QoS::AtMostOnce, false);
    p.ping();
    // The QoS 0 publish was routed before the PINGRESP; the owner shard may be another one,
    // so wait (bounded) for its count.
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let m = scrape(&b);
        if total(
            &m,
            "shardmq_messages_dropped_total",
            "qos0_offline_disabled",
        ) == 1.0
        {
            break;
        }
        assert!(Instant::now() < deadline, "the drop was not counted");
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ------------------------------------------------------------------------------ DELETE

const TOKEN: &str = "test-token-0123456789";
const WITH_TOKEN: &str = "[sys]\ninterval_s = 0\n[admin]\ntoken = \"test-token-0123456789\"\n";

fn delete(b: &TestBroker, path: &str) -> (u16, String) {
    let auth = format!("Bearer {TOKEN}");
    b.http_with("DELETE", path, &[("Authorization", &auth)])
}

#[test]
fn delete_disconnects_an_online_client_and_discards_its_session() {
    let b = TestBroker::start_with(SHARDS, WITH_TOKEN);
    let id = "delete-me";
    let (mut c, _) = RawClient::connect_v5(b.addr, &ConnectOpts::v5(id, false).expiry(3600));
    c.subscribe_v5(&[("delete/t", support::raw::opts(QoS::AtLeastOnce))], None);
    assert_eq!(get_json(&b, &format!("/api/sessions/{id}"))["online"], true);

    let (status, body) = delete(&b, &format!("/api/sessions/{id}"));
    assert_eq!(status, 204, "{body}");
    assert_eq!(c.expect_disconnect(), ReasonCode::AdministrativeAction);
    let (status, _) = get(&b, &format!("/api/sessions/{id}"));
    assert_eq!(status, 404);
    let (status, _) = delete(&b, &format!("/api/sessions/{id}"));
    assert_eq!(status, 404);

    // Gone with its stored state: a reconnect finds no session, and it survives no restart.
    let (c2, ack) = RawClient::connect_v5(b.addr, &ConnectOpts::v5(id, false).expiry(3600));
    assert!(!ack.session_present);
    c2.disconnect();
    let (status, _) = delete(&b, &format!("/api/sessions/{id}"));
    assert_eq!(status, 204);
    let status = b.stop_keep_dir();
    let b = TestBroker::start_in(SHARDS, WITH_TOKEN, status);
    let (status, _) = get(&b, &format!("/api/sessions/{id}"));
    assert_eq!(status, 404);
}

/// Search, the state filter, the kick action and the rate history, over HTTP.
#[test]
fn sessions_are_searched_kicked_and_rates_reported_over_http() {
    let b = TestBroker::start_with(SHARDS, WITH_TOKEN);
    let (mut kicked, _) =
        RawClient::connect_v5(b.addr, &ConnectOpts::v5("Kick-Me", false).expiry(600));
    let _other = RawClient::connect_v311(b.addr, "someone-else");
    let ids = |path: &str| -> Vec<String> {
        get_json(&b, path)["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["client_id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(ids("/api/sessions?q=kick"), ["Kick-Me"]);
    assert_eq!(ids("/api/sessions?q=127.0.0.1").len(), 2, "by address");
    assert_eq!(ids("/api/sessions?state=offline"), Vec::<String>::new());
    let me = get_json(&b, "/api/sessions/Kick-Me");
    assert!(
        me["address"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{me}"
    );
    assert!(me["connected_since_unix_ms"].as_u64().is_some(), "{me}");
    assert_eq!(me["keep_alive_s"], 0);
    // Bad parameters get 400 and a reason.
    let (status, body) = get(&b, &format!("/api/sessions?q={}", "x".repeat(257)));
    assert_eq!(status, 400, "{body}");
    let (status, body) = get(&b, "/api/sessions?state=asleep");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("online"), "{body}");

    // Kick: the token is needed; the client gets 0x98; the session stays, offline.
    let path = "/api/sessions/Kick-Me/disconnect";
    assert_eq!(b.http("POST", path).0, 401);
    let auth = format!("Bearer {TOKEN}");
    let (status, body) = b.http_with("POST", path, &[("Authorization", &auth)]);
    assert_eq!(status, 204, "{body}");
    assert_eq!(kicked.expect_disconnect(), ReasonCode::AdministrativeAction);
    let me = get_json(&b, "/api/sessions/Kick-Me");
    assert_eq!(me["online"], false, "{me}");
    let gone = me["offline_since_unix_ms"].as_u64().expect("offline since");
    assert_eq!(me["expires_at_unix_ms"].as_u64(), Some(gone + 600_000));
    assert_eq!(ids("/api/sessions?state=offline"), ["Kick-Me"]);
    assert_eq!(ids("/api/sessions?state=online"), ["someone-else"]);
    let (status, _) = b.http_with("POST", path, &[("Authorization", &auth)]);
    assert_eq!(status, 404, "not online any more");
    assert_eq!(total(&scrape(&b), "shardmq_clients_kicked_total", ""), 1.0);

    // Rates: a burst shows in the history once a sample after it is taken.
    let mut p = RawClient::connect_v311(b.addr, "rate-publisher");
    for i in 0..100 {
        p.publish(
            "rates/t",
            format!("{i}").as_bytes(),
            QoS::AtLeastOnce,
            false,
        );
    }
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let r = get_json(&b, "/api/rates");
        assert_eq!(r["step_s"], 2.0);
        let points = r["points"].as_array().unwrap();
        let received: f64 = points
            .iter()
            .map(|p| p["received_per_s"].as_f64().unwrap() * 2.0)
            .sum();
        if received >= 100.0 {
            assert!(received < 101.0, "each message counted once: {r}");
            assert!(points
                .iter()
                .any(|p| p["bytes_in_per_s"].as_f64().unwrap() > 0.0));
            break;
        }
        assert!(Instant::now() < deadline, "no burst in the rates: {r}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A kicked client that keeps sending has nothing more handled: the broker stops reading
/// its packets at once, however much is waiting on the socket (before, a client that never
/// paused kept being served under its old identity for hundreds of thousands of messages).
#[test]
fn a_kicked_client_that_keeps_sending_is_not_served_any_more() {
    let b = TestBroker::start_with(SHARDS, WITH_TOKEN);
    let received = |b: &TestBroker| total(&scrape(b), "shardmq_messages_received_total", "");
    let mut flooder = RawClient::connect_v311(b.addr, "flooder");
    let mut batch = bytes::BytesMut::new();
    for _ in 0..1000 {
        Packet::Publish(shardmq::protocol::Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: shardmq::protocol::TopicName::new("flood/t").unwrap(),
            packet_id: None,
            properties: Default::default(),
            payload: bytes::Bytes::from_static(b"x"),
        })
        .encode(shardmq::protocol::ProtocolVersion::V3_1_1, &mut batch)
        .unwrap();
    }
    // Sends until the broker closes the socket (bounded in count and time).
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let sent2 = sent.clone();
    let flood = std::thread::spawn(move || {
        // Longer than the kick may take (below) plus the broker's 2 s drain.
        let end = Instant::now() + 3 * TIMEOUT;
        for _ in 0..1_000_000 {
            if !flooder.try_send_bytes(&batch) {
                return true;
            }
            sent2.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if Instant::now() > end {
                break;
            }
        }
        false
    });
    // 300 batches (5 MB) are more than the socket buffers hold: the broker is reading.
    let deadline = Instant::now() + TIMEOUT;
    while sent.load(std::sync::atomic::Ordering::Relaxed) < 300 {
        assert!(Instant::now() < deadline, "the flood never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The kick goes through the shard the flood keeps busy: on a loaded machine its answer
    // can miss the admin endpoint's 10 s gather (503; the kick still happens, later).
    let auth = format!("Bearer {TOKEN}");
    loop {
        let (status, body) = b.http_with(
            "POST",
            "/api/sessions/flooder/disconnect",
            &[("Authorization", &auth)],
        );
        match status {
            204 => break,
            503 if Instant::now() < deadline => continue,
            404 if Instant::now() < deadline => break, // done by an earlier, late attempt
            _ => panic!("kick: {status} {body}"),
        }
    }
    let at_kick = received(&b);
    assert!(
        flood.join().unwrap(),
        "the broker closed the flooder's socket"
    );
    let after = received(&b) - at_kick;
    // At most what was decoded from the read buffer already (16 KiB of 17-byte packets).
    assert!(after < 2_000.0, "{after} messages handled after the kick");
}

// ---------------------------------------------------------------------------- dashboard

/// The client ids in the sessions table, in order.
fn session_rows(tab: &headless_chrome::Tab) -> Vec<String> {
    let v = js(
        tab,
        "[...document.querySelectorAll('#sessions tbody tr[data-client]')].map(r => r.dataset.client)",
    );
    serde_json::from_value(v).unwrap_or_default()
}

fn type_search(tab: &headless_chrome::Tab, id: &str, text: &str) {
    js(tab, &format!("document.getElementById('{id}').value = ''"));
    tab.find_element(&format!("#{id}"))
        .expect("search box")
        .type_into(text)
        .expect("type");
}

/// Clicks, with the mouse, the middle of the element matched by `selector` (found anew
/// each time: rows are redrawn on every refresh) until the page shows `then`.
fn click_until(tab: &headless_chrome::Tab, selector: &str, then: &str) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let at = js(
            tab,
            &format!(
                "(() => {{ const e = document.querySelector('{selector}'); if (!e) return null; \
                 e.scrollIntoView({{block: 'center'}}); const r = e.getBoundingClientRect(); \
                 return [r.x + r.width / 2, r.y + r.height / 2]; }})()"
            ),
        );
        if let Some([x, y]) = serde_json::from_value::<Option<[f64; 2]>>(at)
            .ok()
            .flatten()
        {
            tab.click_point(headless_chrome::browser::tab::point::Point { x, y })
                .expect("click");
            let shown = Instant::now() + Duration::from_secs(1);
            while Instant::now() < shown {
                if js(tab, then) == Value::Bool(true) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        } else {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            Instant::now() < deadline,
            "clicking {selector} never led to {then}; the page shows: {}",
            js(tab, "document.body.innerText")
        );
    }
}

fn screenshot(tab: &headless_chrome::Tab, dir: &std::path::Path, name: &str) {
    use headless_chrome::protocol::cdp::Page::CaptureScreenshotFormatOption;
    let png = tab
        .capture_screenshot(CaptureScreenshotFormatOption::Png, None, None, true)
        .expect("screenshot");
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    std::fs::write(dir.join(name), png).expect("write screenshot");
}

/// The dashboard in headless Chromium, driven as an operator does: a full queue stands out,
/// paging through 63 sessions, searching, the traffic chart, and disconnecting then
/// deleting a session with the admin token. Screenshots are kept in
/// `$DASHBOARD_SCREENSHOTS` when set.
#[test]
fn dashboard_pages_searches_charts_and_kicks_in_headless_chromium() {
    let chromium = support::browser::chromium_path();
    // A queue of four, offered five: one drop, and the queue shown as full.
    let b = TestBroker::start_with(
        SHARDS,
        &format!("{WITH_TOKEN}[limits]\nqueue_messages_max = 4\n"),
    );
    let id = "dashboard-watcher";
    offline_session_with_queue(&b, id, "dash/q", 5);
    let _online: Vec<RawClient> = (0..60)
        .map(|i| RawClient::connect_v311(b.addr, &format!("dash-page-{i:02}")))
        .collect();
    let (mut kicked, _) =
        RawClient::connect_v5(b.addr, &ConnectOpts::v5("dash-kick", false).expiry(3600));
    let mut retainer = RawClient::connect_v311(b.addr, "dash-retainer");
    retainer.publish("dash/retained/kitchen", b"21.5", QoS::AtLeastOnce, true);
    retainer.publish("dash/retained/hall", b"19", QoS::AtLeastOnce, true);

    let profile = tempfile::tempdir().expect("temp dir");
    let shots_dir = std::env::var_os("DASHBOARD_SCREENSHOTS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| profile.path().to_path_buf());
    std::fs::create_dir_all(&shots_dir).expect("screenshot dir");
    let browser = support::browser::launch(chromium, profile.path());
    let tab = browser.new_tab().expect("tab");
    tab.navigate_to(&format!("http://{}/", admin(&b)))
        .expect("open the dashboard");

    // A broker alone has no cluster panel.
    wait_js(
        &tab,
        "document.querySelectorAll('#shards tbody tr').length > 0",
    );
    assert_eq!(js(&tab, "document.getElementById('cluster').hidden"), true);

    // Page 1 of 63 sessions, by client id: 50 rows.
    wait_js(
        &tab,
        "document.querySelectorAll('#sessions tbody tr[data-client]').length === 50",
    );
    let rows = session_rows(&tab);
    assert_eq!(rows[0], "dash-kick");
    assert_eq!(rows[49], "dash-page-48");
    assert_eq!(
        js(
            &tab,
            "document.getElementById('sessions-total').textContent"
        ),
        "(63)"
    );
    assert_eq!(
        js(&tab, "document.getElementById('sessions-page').textContent"),
        "page 1: 1–50 of 63"
    );
    let row = "document.querySelector('#sessions tr[data-client=\"dash-page-00\"]')";
    assert_eq!(js(&tab, &format!("{row}.dataset.state")), "online");
    assert_eq!(
        js(
            &tab,
            &format!("{row}.querySelector('.address').textContent.startsWith('127.0.0.1:')")
        ),
        true,
        "the client's address"
    );
    assert_eq!(
        js(
            &tab,
            &format!("{row}.querySelector('.since').textContent.endsWith('ago')")
        ),
        true
    );
    // The broker's $SYS topics are not listed unless asked for; the user's are.
    wait_js(
        &tab,
        "[...document.querySelectorAll('#retained .topic')].map(t => t.textContent).join() === 'dash/retained/hall,dash/retained/kitchen'",
    );
    screenshot(&tab, &shots_dir, "dashboard-1-first-page.png");

    // Page 2: the rest, with the full queue.
    click_until(
        &tab,
        "#sessions-next",
        "document.getElementById('sessions-page').textContent === 'page 2: 51–63 of 63'",
    );
    let rows = session_rows(&tab);
    assert_eq!(rows.len(), 13);
    assert_eq!(rows.last().map(String::as_str), Some(id));
    let row = format!("document.querySelector('#sessions tr[data-client=\"{id}\"]')");
    assert_eq!(js(&tab, &format!("{row}.dataset.queued")), "4");
    assert_eq!(js(&tab, &format!("{row}.dataset.state")), "offline");
    assert_eq!(
        js(
            &tab,
            &format!("{row}.querySelector('.dropped').textContent")
        ),
        "1 (queue full)"
    );
    assert_eq!(
        js(&tab, &format!("{row}.querySelector('.dropped').className")),
        "dropped full"
    );
    // A 3.1.1 persistent session expires after sessions.session_expiry_max_s (7 days).
    assert_eq!(
        js(
            &tab,
            &format!("{row}.querySelector('.expires').textContent")
        ),
        "in 7 d"
    );
    screenshot(&tab, &shots_dir, "dashboard-2-second-page.png");
    click_until(
        &tab,
        "#sessions-prev",
        "document.getElementById('sessions-page').textContent === 'page 1: 1–50 of 63'",
    );

    // Search: by part of the client id, any case.
    type_search(&tab, "session-search", "PAGE-3");
    wait_js(
        &tab,
        "document.querySelectorAll('#sessions tbody tr[data-client]').length === 10",
    );
    let rows = session_rows(&tab);
    assert_eq!(rows.first().map(String::as_str), Some("dash-page-30"));
    assert_eq!(rows.last().map(String::as_str), Some("dash-page-39"));
    type_search(&tab, "session-search", "watcher");
    wait_js(&tab, &format!("document.querySelector('#sessions tbody tr').dataset.client === '{id}' && document.querySelectorAll('#sessions tbody tr').length === 1"));
    type_search(&tab, "subscription-search", "dash/q");
    wait_js(&tab, "[...document.querySelectorAll('#subscriptions .filter')].map(t => t.textContent).join() === 'dash/q'");

    // Traffic: a burst shows in the chart once two samples (2 s apart) have it.
    let mut p = RawClient::connect_v311(b.addr, "dash-burst");
    for i in 0..200 {
        p.publish(
            "dash/burst",
            format!("{i}").as_bytes(),
            QoS::AtLeastOnce,
            false,
        );
    }
    wait_js(
        &tab,
        "Number(document.querySelector('#chart-messages svg').dataset.peak) >= 10",
    );
    screenshot(&tab, &shots_dir, "dashboard-3-search-and-chart.png");

    // Disconnect, as an operator: nothing without the token; with it, two clicks.
    type_search(&tab, "session-search", "dash-kick");
    wait_js(
        &tab,
        "document.querySelector('#sessions tbody tr').dataset.client === 'dash-kick'",
    );
    click_until(
        &tab,
        "#sessions button.kick",
        "document.getElementById('action-status').textContent.includes('admin token')",
    );
    tab.find_element("#token")
        .expect("token box")
        .type_into(TOKEN)
        .expect("type the token");
    click_until(
        &tab,
        "#sessions button.kick",
        "document.querySelector('#sessions button.kick.confirm') !== null",
    );
    click_until(
        &tab,
        "#sessions button.kick.confirm",
        "document.getElementById('action-status').textContent === 'disconnected dash-kick'",
    );
    assert_eq!(kicked.expect_disconnect(), ReasonCode::AdministrativeAction);
    wait_js(
        &tab,
        "document.querySelector('#sessions tbody tr').dataset.state === 'offline'",
    );
    assert_eq!(
        js(
            &tab,
            "document.querySelector('#sessions tbody tr .expires').textContent"
        ),
        "in 60 min"
    );
    let api = get_json(&b, "/api/sessions/dash-kick");
    assert_eq!(api["online"], false, "the session stays: {api}");
    screenshot(&tab, &shots_dir, "dashboard-4-kicked.png");

    // Delete: the session is gone.
    click_until(
        &tab,
        "#sessions button.delete",
        "document.querySelector('#sessions button.delete.confirm') !== null",
    );
    click_until(
        &tab,
        "#sessions button.delete.confirm",
        "document.getElementById('action-status').textContent === 'deleted session dash-kick'",
    );
    wait_js(
        &tab,
        "document.querySelector('#sessions tbody td.empty') !== null",
    );
    assert_eq!(get(&b, "/api/sessions/dash-kick").0, 404);
    assert_eq!(
        js(&tab, "document.getElementById('status').className"),
        "",
        "no refresh failed"
    );
}

// --------------------------------------------------------------------------------- $SYS

#[test]
fn sys_topics_reach_sys_subscribers_only() {
    let b = TestBroker::start_with(SHARDS, "[sys]\ninterval_s = 1\n");
    let (mut sys, _) = RawClient::connect(b.addr, &ConnectOpts::v311("sys-watcher", true));
    sys.sub(&[("$SYS/broker/#", QoS::AtMostOnce)]);
    let (mut all, _) = RawClient::connect(b.addr, &ConnectOpts::v311("hash-watcher", true));
    all.sub(&[("#", QoS::AtMostOnce)]);

    // A client may not publish there: acknowledged, dropped.
    let mut p = RawClient::connect_v311(b.addr, "sys-forger");
    p.publish("$SYS/broker/forged", b"x", QoS::AtLeastOnce, true);
    p.publish("$SYS/broker/forged", b"y", QoS::AtMostOnce, false);
    p.ping();

    let mut seen: HashMap<String, String> = HashMap::new();
    let mut rounds = 0;
    // The retained values, then fresh rounds until one counts the three clients.
    while rounds < 2
        || seen
            .get("$SYS/broker/clients/connected")
            .map(String::as_str)
            != Some("3")
    {
        let Packet::Publish(m) =
            sys.recv_matching("a $SYS publish", |p| matches!(p, Packet::Publish(_)))
        else {
            unreachable!()
        };
        let t = m.topic.as_str().to_string();
        rounds += usize::from(t == "$SYS/broker/load/bytes/sent/15min");
        seen.insert(t, String::from_utf8_lossy(&m.payload).into_owned());
    }
    for t in [
        "clients/connected",
        "clients/disconnected",
        "clients/total",
        "messages/received",
        "messages/sent",
        "bytes/received",
        "bytes/sent",
        "subscriptions/count",
        "retained messages/count",
        "uptime",
        "version",
        "load/messages/received/1min",
        "load/messages/sent/5min",
        "load/bytes/received/15min",
        "load/bytes/sent/1min",
    ] {
        assert!(
            seen.contains_key(&format!("$SYS/broker/{t}")),
            "{t}: {seen:?}"
        );
    }
    assert!(seen["$SYS/broker/uptime"].ends_with(" seconds"));
    assert!(seen["$SYS/broker/version"].starts_with("shardmq "));
    assert!(!seen.contains_key("$SYS/broker/forged"), "{seen:?}");

    // `#` saw none of it (MQTT-4.7.2-1): a normal publish is the first thing it gets.
    p.publish("after/sys", b"z", QoS::AtMostOnce, false);
    let first = all.recv_publish();
    assert_eq!(first.topic.as_str(), "after/sys");
}

// --------------------------------------------------------------------------------- stop

/// A browser keeps its connection to the dashboard open; SIGTERM still stops the broker.
#[test]
fn sigterm_stops_the_broker_with_an_admin_connection_open() {
    use std::io::{Read, Write};
    let b = TestBroker::start_with(SHARDS, "[sys]\ninterval_s = 0\n");
    let mut s = std::net::TcpStream::connect(admin(&b)).expect("connect");
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.write_all(b"GET /api/shards HTTP/1.1\r\nHost: localhost\r\nConnection: keep-alive\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("\"shards\"") {
        let n = s.read(&mut chunk).expect("read");
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&chunk[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 200"));
    let status = b.stop();
    assert!(status.success(), "exit status {status}");
}

#[test]
fn no_admin_leaves_the_ready_line_without_an_address() {
    let b = TestBroker::start_with(1, "[admin]\nenabled = false\n");
    assert_eq!(b.admin, None);
}

// ---------------------------------------------------------------------------- security

/// A raw HTTP/1.1 request with the given Host header (and more headers): the status code.
fn raw_status(b: &TestBroker, method: &str, path: &str, host: &str, extra: &str) -> u16 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(admin(b)).expect("connect");
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).expect("answer");
    out.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {out:?}"))
}

/// A page that rebinds its own name to the broker's address reaches the endpoint with its
/// own name in the Host header: refused (403), reading and deleting alike. Loopback names
/// and IP addresses are served. Changing requests need the configured bearer token.
#[test]
fn a_foreign_host_name_is_refused_and_changes_need_the_token() {
    let b = TestBroker::start_with(SHARDS, WITH_TOKEN);
    let port = admin(&b).port();
    let id = "guarded";
    let (c, _) = RawClient::connect_v5(b.addr, &ConnectOpts::v5(id, false).expiry(3600));
    c.disconnect();
    let auth = format!("Authorization: Bearer {TOKEN}\r\n");
    let path = format!("/api/sessions/{id}");
    for host in [
        "rebind.attacker.test",
        &format!("rebind.attacker.test:{port}"),
    ] {
        assert_eq!(
            raw_status(&b, "GET", "/api/sessions", host, ""),
            403,
            "{host}"
        );
        assert_eq!(raw_status(&b, "GET", "/", host, ""), 403, "{host}");
        assert_eq!(raw_status(&b, "GET", "/metrics", host, ""), 403, "{host}");
        assert_eq!(raw_status(&b, "DELETE", &path, host, &auth), 403, "{host}");
    }
    for host in [
        format!("localhost:{port}"),
        format!("127.0.0.1:{port}"),
        "127.0.0.1".to_string(),
    ] {
        assert_eq!(raw_status(&b, "GET", &path, &host, ""), 200, "{host}");
    }
    // No token, a wrong one, the right one.
    let (status, _) = b.http("DELETE", &path);
    assert_eq!(status, 401);
    let (status, _) = b.http_with(
        "DELETE",
        &path,
        &[("Authorization", "Bearer nope-nope-nope-nope")],
    );
    assert_eq!(status, 401);
    let (status, _) = b.http_with("DELETE", &path, &[("Authorization", TOKEN)]);
    assert_eq!(status, 401, "the Bearer scheme is required");
    assert_eq!(get_json(&b, &path)["client_id"], id, "still there");
    let (status, body) = delete(&b, &path);
    assert_eq!(status, 204, "{body}");

    // Without a configured token, changing requests are off.
    let b = TestBroker::start_with(SHARDS, "[sys]\ninterval_s = 0\n");
    let (c, _) = RawClient::connect_v5(b.addr, &ConnectOpts::v5(id, false).expiry(3600));
    c.disconnect();
    let (status, body) = b.http_with(
        "DELETE",
        &path,
        &[("Authorization", "Bearer anything-at-all-here")],
    );
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("admin.token"), "{body}");
    assert_eq!(get_json(&b, &path)["client_id"], id);
}

/// `admin.allowed_hosts` names the extra host names served (a broker reached by name).
#[test]
fn allowed_hosts_are_served() {
    let b = TestBroker::start_with(SHARDS, "[admin]\nallowed_hosts = [\"broker.internal\"]\n");
    let port = admin(&b).port();
    assert_eq!(
        raw_status(
            &b,
            "GET",
            "/api/shards",
            &format!("broker.internal:{port}"),
            ""
        ),
        200
    );
    assert_eq!(
        raw_status(&b, "GET", "/api/shards", "other.internal", ""),
        403
    );
}
