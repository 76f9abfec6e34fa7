//! Cluster membership against a real 3-member etcd: nodes see each other and their links,
//! leave gracefully or die, come back, lose their lease under SIGSTOP and rejoin, and never
//! share a node id; losing the etcd leader costs no lease. Every process is started here on
//! ephemeral 127.0.0.1 ports and stopped by PID.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a failure is a test failure"
)]

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::cluster::*;
use support::etcd::Etcd;
use support::{TestBroker, TIMEOUT};

/// Runs the broker (one shard, its own data directory, no admin endpoint) with `args` until
/// it exits: for starts that must fail.
fn run_to_the_end(args: &[&str]) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    Command::new(env!("CARGO_BIN_EXE_shardmq"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--no-admin",
            "--no-pin",
            "--shards",
            "1",
        ])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

#[test]
fn three_nodes_see_each_other_their_links_and_the_slot_table() {
    let etcd = Etcd::start(3);
    let p = prefix("three");
    let a = start_node("a", &etcd, &p);
    let b = start_node("b", &etcd, &p);
    let c = start_node("c", &etcd, &p);

    // The ready line names the node, the etcd endpoints in use and the members seen.
    assert!(a.ready_line.contains(" node=a "), "{}", a.ready_line);
    assert!(
        a.ready_line.contains(&format!("etcd={}", etcd.endpoints())),
        "{}",
        a.ready_line
    );
    assert!(a.ready_line.contains(" members=a"), "{}", a.ready_line);
    assert!(c.ready_line.contains(" members=a,b,c"), "{}", c.ready_line);

    for (node, name) in [(&a, "a"), (&b, "b"), (&c, "c")] {
        wait_until("every member up with a live link", TIMEOUT, || {
            ["a", "b", "c"].iter().all(|m| {
                member_state(node, m) == "up" && (*m == name || link_state(node, m) == "up")
            })
        });
        let v = node.admin_json("/api/cluster");
        assert_eq!(v["enabled"], true);
        assert_eq!(v["node"], name);
        assert_eq!(v["state"], "up");
        assert_eq!(v["members"].as_array().unwrap().len(), 3, "{v}");
        // The first node created the slot table; the others took even shares of it.
        let slots: u64 = ["a", "b", "c"]
            .iter()
            .map(|m| member(&v, m)["slots"].as_u64().unwrap())
            .sum();
        assert_eq!(slots, 4096, "{v}");
        wait_balanced(node, &["a", "b", "c"]);
        assert_eq!(member(&v, name)["this_node"], true);
        assert!(member(&v, name)["link"].is_null());
        let me = member(&v, name);
        assert_eq!(me["mqtt"][0].as_str().unwrap(), node.addr.to_string());
        for other in ["a", "b", "c"].iter().filter(|o| **o != name) {
            let link = &member(&v, other)["link"];
            assert_eq!(link["connects_total"], 1, "{v}");
            assert!(link["last_error"].is_null(), "{v}");
        }
    }
    // The same in /metrics, per member and per link.
    wait_until("a link's round trip measured", TIMEOUT, || {
        let (_, text) = a.http("GET", "/metrics");
        text.contains("shardmq_cluster_link_rtt_seconds{node=\"a\",member=\"b\"}")
    });
    assert_eq!(
        a.metric("shardmq_cluster_member_up{node=\"a\",member=\"c\"}"),
        1.0
    );
    assert!(a.metric("shardmq_cluster_member_slots{node=\"a\",member=\"a\"}") >= 1364.0);
    assert_eq!(
        a.metric("shardmq_cluster_link_up{node=\"a\",member=\"b\"}"),
        1.0
    );
    assert_eq!(a.metric("shardmq_cluster_lease_held{node=\"a\"}"), 1.0);
    assert_eq!(
        a.metric("shardmq_cluster_lease_lost_total{node=\"a\"}"),
        0.0
    );
    // etcd holds the live records and the table.
    let table: Value = serde_json::from_str(&etcd.get(&format!("{p}/slots")).unwrap()).unwrap();
    assert_eq!(table["ranges"][0]["node"], "a");
    assert!(table["epoch"].as_u64().unwrap() >= 3, "{table}");
    assert!(etcd.get(&format!("{p}/nodes/b")).is_some());
    drop((a, b, c));
}

#[test]
fn a_node_that_stops_or_dies_is_down_and_a_restart_rejoins() {
    let etcd = Etcd::start(3);
    let p = prefix("down");
    let a = start_node("a", &etcd, &p);
    let b = start_node("b", &etcd, &p);
    let c = start_node("c", &etcd, &p);
    wait_until("a sees b and c up", TIMEOUT, || {
        member_state(&a, "b") == "up" && member_state(&a, "c") == "up"
    });

    // A graceful stop revokes the lease: seen at once, not after the TTL.
    let t = Instant::now();
    assert!(b.stop().success());
    wait_until("a sees b down after its stop", TIMEOUT, || {
        member_state(&a, "b") == "down"
    });
    assert!(
        t.elapsed() < Duration::from_secs(TTL_S),
        "took {:?}",
        t.elapsed()
    );
    assert!(etcd.get(&format!("{p}/nodes/b")).is_none());
    // Still a member (down), not forgotten.
    assert!(etcd.get(&format!("{p}/members/b")).is_some());

    // kill -9: seen when the lease expires.
    let dir = c.kill9();
    wait_until("a sees c down after kill -9", TIMEOUT, || {
        member_state(&a, "c") == "down"
    });
    wait_until("a's link to c down", TIMEOUT, || {
        link_state(&a, "c") == "down"
    });

    // Restarted at once on its data: it waits for its old record (if any is left) and
    // joins again.
    let c = TestBroker::start_in(1, &node_toml("c", &etcd, &p), dir);
    assert!(c.ready_line.contains(" node=c "));
    wait_until("a sees c up again", TIMEOUT, || {
        let ok = member_state(&a, "c") == "up" && link_state(&a, "c") == "up";
        if !ok {
            eprintln!("{}", a.admin_json("/api/cluster"));
        }
        ok
    });
    let v = c.admin_json("/api/cluster");
    assert_eq!(member(&v, "b")["state"], "down", "{v}");
    drop((a, c));
}

#[test]
fn a_restart_right_after_kill9_waits_for_the_old_lease() {
    let etcd = Etcd::start(3);
    let p = prefix("restart");
    // A long lease, so that the old record is surely still there when the new process
    // starts.
    let toml = node_toml_ttl("a", &etcd, &p, 10);
    let a = TestBroker::start_with(1, &toml);
    let dir = a.kill9();
    let killed = Instant::now();
    assert!(etcd.get(&format!("{p}/nodes/a")).is_some());
    // The new process takes the id once the old record is gone, not before; with a
    // shorter lease (an operator changed it), which it keeps alive while it waits.
    let a = TestBroker::start_in(1, &node_toml_ttl("a", &etcd, &p, 3), dir);
    assert!(
        killed.elapsed() >= Duration::from_secs(5),
        "{:?}",
        killed.elapsed()
    );
    let v = a.admin_json("/api/cluster");
    assert_eq!(v["state"], "up");
    assert_eq!(member(&v, "a")["state"], "up");
    // The lease it waited with is the one it holds: no loss and no second join for longer
    // than that lease's whole time to live.
    let joined = Instant::now();
    wait_until("a lease's time to live passes", TIMEOUT, || {
        joined.elapsed() > Duration::from_secs(4)
    });
    let v = a.admin_json("/api/cluster");
    assert_eq!(v["counters"]["lease_lost_total"], 0, "{v}");
    assert_eq!(v["counters"]["joins_total"], 1, "{v}");
}

#[test]
fn a_live_node_id_cannot_be_taken_by_a_second_process() {
    let etcd = Etcd::start(3);
    let p = prefix("twice");
    let a = start_node("a", &etcd, &p);
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, node_toml("a", &etcd, &p)).unwrap();
    let out = run_to_the_end(&["--config", cfg.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("node id a is already live"), "{err}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("shardmq ready"));
    // The first one is untouched.
    let v = a.admin_json("/api/cluster");
    assert_eq!(v["state"], "up");
    assert_eq!(v["counters"]["lease_lost_total"], 0);
}

#[test]
fn sigstop_past_the_lease_fences_the_node_and_sigcont_rejoins() {
    let etcd = Etcd::start(3);
    let p = prefix("stop");
    let a = start_node("a", &etcd, &p);
    let b = start_node("b", &etcd, &p);
    wait_until("a sees b up", TIMEOUT, || member_state(&a, "b") == "up");

    b.signal(libc::SIGSTOP);
    wait_until("a sees b down while it is stopped", TIMEOUT, || {
        member_state(&a, "b") == "down"
    });
    b.signal(libc::SIGCONT);
    // b finds its lease gone, counts the loss and joins again with a fresh one.
    wait_until("b rejoined", TIMEOUT, || {
        let v = b.admin_json("/api/cluster");
        v["state"] == "up" && v["counters"]["lease_lost_total"].as_u64() >= Some(1)
    });
    wait_until("a sees b up again", TIMEOUT, || {
        member_state(&a, "b") == "up"
    });
    assert!(b.metric("shardmq_cluster_joins_total{node=\"b\"}") >= 2.0);
}

#[test]
fn losing_the_etcd_leader_costs_no_lease() {
    let mut etcd = Etcd::start(3);
    let p = prefix("leader");
    // The default lease (6 s): an etcd election takes 1-2 s, more on a loaded machine.
    let a = TestBroker::start_with(1, &node_toml_ttl("a", &etcd, &p, 6));
    let b = TestBroker::start_with(1, &node_toml_ttl("b", &etcd, &p, 6));
    wait_until("a sees b up", TIMEOUT, || member_state(&a, "b") == "up");
    let leader = etcd.leader();
    etcd.members[leader].kill9();
    assert!(
        etcd.wait_healthy(),
        "the two other etcd members elect a leader"
    );
    // Each node renews its lease at least twice more after the kill, and never loses it.
    for node in [&a, &b] {
        let joins = node.metric(&format!(
            "shardmq_cluster_joins_total{{node=\"{}\"}}",
            node.admin_json("/api/cluster")["node"].as_str().unwrap()
        ));
        let mut renewals = 0;
        let mut last = u64::MAX;
        wait_until("two renewals after the leader's death", TIMEOUT * 2, || {
            let v = node.admin_json("/api/cluster");
            let ago = v["lease_renewed_ms_ago"].as_u64().unwrap_or(u64::MAX);
            if ago < last {
                renewals += 1;
            }
            last = ago;
            renewals >= 3
        });
        let v = node.admin_json("/api/cluster");
        assert_eq!(v["state"], "up", "{v}");
        assert_eq!(v["counters"]["lease_lost_total"], 0, "{v}");
        assert_eq!(
            node.metric(&format!(
                "shardmq_cluster_joins_total{{node=\"{}\"}}",
                v["node"].as_str().unwrap()
            )),
            joins
        );
    }
    assert_eq!(member_state(&a, "b"), "up");
}

#[test]
fn a_damaged_slot_table_in_etcd_is_ignored() {
    let etcd = Etcd::start(3);
    let p = prefix("damaged");
    let a = start_node("a", &etcd, &p);
    etcd.put(&format!("{p}/slots"), "{\"epoch\":9,\"ranges\":[]}");
    etcd.put(&format!("{p}/nodes/zz"), "not json");
    // A well-formed record without a lease is not a node's either.
    etcd.put(
        &format!("{p}/nodes/yy"),
        r#"{"id":"yy","cluster":"127.0.0.1:9","mqtt":[],"admin":null,"state":"up","lease_ttl_s":3,"started_ms":0}"#,
    );
    // A later, valid change is still applied: the watch lives on, and the last good table
    // (epoch 1, every slot a's) is what a shares out to b.
    let b = start_node("b", &etcd, &p);
    wait_until("a sees b", TIMEOUT, || member_state(&a, "b") == "up");
    wait_balanced(&a, &["a", "b"]);
    let v = a.admin_json("/api/cluster");
    assert_eq!(v["slots_epoch"], 2, "{v}");
    assert_eq!(member(&v, "a")["slots"], 2048, "{v}");
    assert!(v["members"]
        .as_array()
        .unwrap()
        .iter()
        .all(|m| m["id"] != "zz"));
    drop(b);
}

#[test]
fn bad_cluster_settings_are_refused_with_one_line() {
    let run = |args: &[&str]| {
        let out = run_to_the_end(args);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        )
    };
    let (code, err) = run(&["--cluster-node", "a"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("cluster.listen"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    let (code, err) = run(&["--cluster-node", "a/b", "--cluster-listen", "127.0.0.1:0"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("cluster.node"), "{err}");
    let (code, err) = run(&[
        "--cluster-node",
        "a",
        "--cluster-listen",
        "127.0.0.1:0",
        "--cluster-etcd",
        "https://x:1",
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("cluster.etcd"), "{err}");
    let (code, err) = run(&["--cluster-etcd", "http://127.0.0.1:1"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("cluster.node"), "{err}");

    // The limits of moving sessions between nodes.
    let dir = tempfile::tempdir().unwrap();
    for (line, key) in [
        ("move_timeout_s = 0", "cluster.move_timeout_s"),
        ("hand_over_timeout_s = 99999", "cluster.hand_over_timeout_s"),
        ("move_window_bytes = 0", "cluster.move_window_bytes"),
        ("moves_in_max = 0", "cluster.moves_in_max"),
        ("missed_releases_max = 0", "cluster.missed_releases_max"),
    ] {
        let cfg = dir.path().join("m.toml");
        std::fs::write(
            &cfg,
            format!("[cluster]\nnode = \"a\"\nlisten = \"127.0.0.1:0\"\netcd = [\"http://127.0.0.1:1\"]\n{line}\n"),
        )
        .unwrap();
        let (code, err) = run(&["--config", cfg.to_str().unwrap()]);
        assert_eq!(code, Some(2), "{line}: {err}");
        assert!(err.contains(key), "{line}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }

    // Nothing listens on the etcd port: a bounded wait, then one line.
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = free.local_addr().unwrap().port();
    drop(free);
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!("[cluster]\nnode = \"a\"\nlisten = \"127.0.0.1:0\"\netcd = [\"http://127.0.0.1:{port}\"]\netcd_timeout_s = 1\n"),
    )
    .unwrap();
    let t = Instant::now();
    let (code, err) = run(&["--config", cfg.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("cannot join the cluster"), "{err}");
    assert!(err.contains(&port.to_string()), "{err}");
    assert!(t.elapsed() < TIMEOUT, "took {:?}", t.elapsed());
}

#[test]
fn the_dashboard_shows_the_cluster_in_headless_chromium() {
    let chromium = support::browser::chromium_path();
    let etcd = Etcd::start(3);
    let p = prefix("dashboard");
    let a = start_node("a", &etcd, &p);
    let b = start_node("b", &etcd, &p);
    wait_until("a sees b's link up", TIMEOUT, || {
        link_state(&a, "b") == "up"
    });
    let profile = tempfile::tempdir().unwrap();
    let browser = support::browser::launch(chromium, profile.path());
    let tab = browser.new_tab().unwrap();
    tab.navigate_to(&format!("http://{}/", a.admin.unwrap()))
        .unwrap();
    support::browser::wait_js(
        &tab,
        "!document.getElementById('cluster').hidden && document.querySelectorAll('#cluster-members tbody tr').length === 2",
    );
    let rows = support::browser::js(
        &tab,
        "[...document.querySelectorAll('#cluster-members tbody tr')].map(r => [...r.cells].map(c => c.textContent))",
    );
    assert_eq!(rows[0][0], "a (this node)", "{rows}");
    assert_eq!(rows[0][1], "up", "{rows}");
    assert_eq!(rows[1][0], "b", "{rows}");
    assert_eq!(rows[1][6], "up", "{rows}");
    let text = support::browser::js(&tab, "document.getElementById('cluster-self').textContent");
    assert_eq!(text, "(this node: a, up)");
    // b stops: the page shows it down.
    assert!(b.stop().success());
    support::browser::wait_js(
        &tab,
        "document.querySelectorAll('#cluster-members tbody tr')[1].cells[1].textContent === 'down'",
    );
}
