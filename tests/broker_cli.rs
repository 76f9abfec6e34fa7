//! The `shardmq` command line: flags, config errors, start-up failures, signals. Each test
//! runs the real binary with `std::process::Command`, on 127.0.0.1 only; a run that should
//! fail is given `--listen 127.0.0.1:0` so that a wrong pass never takes a real port.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests and benchmarks: a failure is the test's failure"
)]

mod support;

use std::net::TcpListener;
use std::process::{Command, Output};

use support::raw::RawClient;
use support::TestBroker;

const BIN: &str = env!("CARGO_BIN_EXE_shardmq");

/// Runs the binary to completion (bounded by TIMEOUT), with the default log filter. The
/// admin endpoint gets an ephemeral port unless `args` name one, so that no run takes the
/// default 8080.
fn run(args: &[&str]) -> Output {
    support::run_to_exit(args)
}

/// Asserts the run failed with `code` and exactly one line on stderr, containing each of
/// `names`; returns that line.
fn one_line_failure(out: &Output, code: i32, names: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(code),
        "exit status; stderr: {stderr}"
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "exactly one line on stderr, got {lines:#?}");
    for n in names {
        assert!(lines[0].contains(n), "{:?} should name {n:?}", lines[0]);
    }
    assert!(
        out.stdout.is_empty(),
        "nothing on stdout: {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    lines[0].to_string()
}

fn config_file(text: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("shardmq.toml");
    std::fs::write(&path, text).expect("write config");
    let p = path.to_str().expect("utf-8 path").to_string();
    (dir, p)
}

#[test]
fn version_flag_prints_the_version() {
    let out = run(&["--version"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("shardmq {}\n", env!("CARGO_PKG_VERSION"))
    );
    assert!(out.stderr.is_empty());
}

#[test]
fn help_flag_lists_the_flags() {
    let out = run(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--config",
        "--listen",
        "--cores",
        "--shards",
        "--no-pin",
        "--data-dir",
        "--admin-listen",
        "--no-admin",
    ] {
        assert!(text.contains(flag), "--help should mention {flag}: {text}");
    }
}

#[test]
fn unknown_flag_exits_2_with_one_line_naming_it() {
    let out = run(&["--listen", "127.0.0.1:0", "--bogus-flag"]);
    one_line_failure(&out, 2, &["--bogus-flag"]);
}

#[test]
fn bad_flag_values_exit_2_with_one_line_naming_the_flag() {
    for (args, flag) in [
        (&["--shards", "many"][..], "--shards"),
        (&["--listen", "not-an-address"][..], "--listen"),
        (
            &["--listen", "127.0.0.1:0", "--cores", "0", "--shards", "1"][..],
            "--cores",
        ),
        (
            &["--listen", "127.0.0.1:0", "--shards", "0"][..],
            "shards.count",
        ),
        (
            &["--listen", "127.0.0.1:0", "--cores", "3-1"][..],
            "shards.cores",
        ),
    ] {
        let out = run(args);
        one_line_failure(&out, 2, &[flag]);
    }
}

/// Runs the broker on a config file holding `toml` and asserts it exits with status 2 and
/// one line on stderr naming `name`.
fn config_refused(toml: &str, name: &str) {
    let (_dir, path) = config_file(toml);
    let out = run(&["--config", &path, "--listen", "127.0.0.1:0"]);
    one_line_failure(&out, 2, &[name]);
}

#[test]
fn bad_config_value_exits_nonzero_with_one_line_naming_the_key() {
    config_refused(
        "[limits]\nqueue_messages_max = 0\n",
        "limits.queue_messages_max",
    );

    config_refused(
        "[limits]\nqueue_messages_max = \"many\"\n",
        "queue_messages_max",
    );

    config_refused(
        "[access]\nsubscribe_deny = [\"a/#/b\"]\n",
        "access.subscribe_deny",
    );
}

#[test]
fn a_replicated_mode_disk_that_did_not_stop_in_order_needs_its_stream_to_start() {
    let data = tempfile::tempdir().expect("temp dir");
    let data_dir = data.path().join("data");
    std::fs::create_dir(&data_dir).expect("mkdir");
    std::fs::write(data_dir.join("replica-ahead"), b"x").expect("marker");
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--no-pin",
        "--shards",
        "1",
        "--data-dir",
        data_dir.to_str().expect("utf-8 path"),
    ];
    // A marker that does not say where the stores are: the start does not guess.
    one_line_failure(
        &run(&args),
        1,
        &["replica-ahead", "<stream> <sequence> <shards>"],
    );
    std::fs::write(data_dir.join("replica-ahead"), b"SHARDMQ_00ff 42 1\n").expect("marker");
    let out = run(&args);
    let line = one_line_failure(
        &out,
        1,
        &["replicated", "cluster.jetstream", "replica-ahead"],
    );
    assert!(line.contains("did not stop in order"), "{line}");
    assert!(
        !data_dir.join("shard-0").exists(),
        "refused before any store opened"
    );
    // The refusal is one line for a storage.durability of "replicated" without the stream too.
    config_refused(
        "[storage]\ndurability = \"replicated\"\n",
        "storage.durability",
    );
}

#[test]
fn unknown_config_key_is_refused() {
    config_refused("[limits]\nqueue_mesages_max = 5\n", "queue_mesages_max");

    config_refused("bogus_section_key = true\n", "bogus_section_key");
}

#[test]
fn missing_config_file_is_one_line() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("absent.toml");
    let path = path.to_str().expect("utf-8 path");
    let out = run(&["--config", path, "--listen", "127.0.0.1:0"]);
    one_line_failure(&out, 2, &["absent.toml"]);
}

#[test]
fn check_config_validates_and_prints() {
    let (_dir, path) = config_file("[limits]\nqueue_messages_max = 5\n");
    let out = run(&["check-config", &path]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("queue_messages_max = 5"), "{text}");

    let (_dir, path) = config_file("[limits]\nqueue_messages_max = 0\n");
    let out = run(&["check-config", &path]);
    one_line_failure(&out, 2, &["limits.queue_messages_max"]);
}

#[test]
fn port_already_taken_exits_nonzero_with_one_line() {
    // std's listener has no SO_REUSEPORT, so the broker's sockets cannot share its port.
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let data = tempfile::tempdir().expect("temp dir");
    let data_dir = data.path().join("data");
    let out = run(&[
        "--listen",
        &addr,
        "--no-pin",
        "--shards",
        "2",
        "--data-dir",
        data_dir.to_str().expect("utf-8 path"),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "must not start; stderr: {stderr}");
    assert_ne!(out.status.code(), None, "an exit, not a signal");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "exactly one line on stderr, got {lines:#?}");
    assert!(
        lines[0].contains(&addr),
        "{:?} should name {addr}",
        lines[0]
    );
    assert!(out.stdout.is_empty(), "no ready line");
    drop(taken);
}

#[test]
fn admin_port_already_taken_exits_nonzero_with_one_line() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let data = tempfile::tempdir().expect("temp dir");
    let data_dir = data.path().join("data");
    let out = run(&[
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        &addr,
        "--no-pin",
        "--shards",
        "1",
        "--data-dir",
        data_dir.to_str().expect("utf-8 path"),
    ]);
    one_line_failure(&out, 1, &[&addr, "admin.listen"]);
    drop(taken);
}

/// SO_REUSEPORT would let a second broker join the first one's port and split the clients
/// between them; it must refuse the taken port instead.
#[test]
fn a_second_broker_on_the_same_port_is_refused() {
    let first = TestBroker::start(2);
    let addr = first.addr.to_string();
    let data = tempfile::tempdir().expect("temp dir");
    let data_dir = data.path().join("data");
    let out = run(&[
        "--listen",
        &addr,
        "--no-pin",
        "--shards",
        "2",
        "--data-dir",
        data_dir.to_str().expect("utf-8 path"),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "exactly one line on stderr, got {lines:#?}");
    assert!(
        lines[0].contains(&addr),
        "{:?} should name {addr}",
        lines[0]
    );
    assert!(out.stdout.is_empty(), "no ready line");
    // The first broker still serves.
    let (_c, present) = RawClient::connect(
        first.addr,
        &support::raw::ConnectOpts::v311("still-here", true),
    );
    assert!(!present);
}

#[test]
fn sigterm_stops_the_broker_with_exit_0() {
    let b = TestBroker::start(2);
    let mut c = RawClient::connect_v311(b.addr, "sigterm-client");
    c.ping();
    let status = b.stop();
    assert!(status.success(), "exit status {status}");
    // The connection was closed by the stop (3.1.1: without DISCONNECT).
    assert!(c.expect_closed().is_empty());
}

#[test]
fn sigterm_right_after_start_exits_0() {
    let b = TestBroker::start(3);
    let status = b.stop();
    assert_eq!(status.code(), Some(0));
}

/// A misspelt or misplaced key names its line and column and the key it most likely meant;
/// two listeners (or a listener and the admin endpoint) on one port are refused.
#[test]
fn config_errors_say_where_and_what_was_meant() {
    let (_d, path) = config_file("[sys]\ninterval_s = 0\n\n[limits]\nqueue_message_max = 5\n");
    let out = run(&["check-config", &path]);
    let line = one_line_failure(
        &out,
        2,
        &[
            "limits.queue_message_max",
            "line 5, column 1",
            "limits.queue_messages_max",
        ],
    );
    assert!(line.contains("did you mean"), "{line}");
    let (_d, path) = config_file("[sessions]\nqueue_messages_max = 5\n");
    let out = run(&["check-config", &path]);
    one_line_failure(
        &out,
        2,
        &["sessions.queue_messages_max", "limits.queue_messages_max"],
    );
    let (_d, path) = config_file("[[listeners]]\naddress = \"0.0.0.0:8080\"\ntransport = \"ws\"\n");
    let out = run(&["check-config", &path]);
    one_line_failure(&out, 2, &["admin.listen", "listeners[0].address", "8080"]);
}

/// A Mosquitto configuration is recognised as one; `convert-mosquitto-conf` prints the
/// equivalent shardmq configuration (which `check-config` accepts) and names on stderr each
/// line it cannot carry over.
#[test]
fn a_mosquitto_config_is_recognised_and_converted() {
    let dir = tempfile::tempdir().expect("temp dir");
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        "pid_file /run/mosquitto/mosquitto.pid\npersistence true\n\
         persistence_location /var/lib/mosquitto/\n\
         log_dest file /var/log/mosquitto/mosquitto.log\n\
         include_dir /etc/mosquitto/conf.d\nallow_anonymous true\n\
         listener 1883 127.0.0.1\nlistener 8080 127.0.0.1\nprotocol websockets\n",
    )
    .unwrap();
    let conf = conf.to_str().unwrap();
    let out = run(&["check-config", conf]);
    one_line_failure(&out, 2, &["Mosquitto", "convert-mosquitto-conf"]);

    let out = Command::new(BIN)
        .args(["convert-mosquitto-conf", conf])
        .output()
        .expect("run");
    assert!(out.status.success());
    let toml = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    for line in [
        ":1: not carried over",
        ":4: not carried over",
        ":5: not carried over",
    ] {
        assert!(stderr.contains(line), "{line}: {stderr}");
    }
    assert!(toml.contains("listen = [\"127.0.0.1:1883\"]"), "{toml}");
    assert!(toml.contains("transport = \"ws\""), "{toml}");
    assert!(
        toml.contains("data_dir = \"/var/lib/mosquitto/\""),
        "{toml}"
    );
    let (_d, path) = config_file(&toml);
    let out = run(&["check-config", &path]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
