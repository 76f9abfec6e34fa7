//! Running under systemd: `config/shardmq.service` passes `systemd-analyze verify`, and the
//! broker speaks the notify protocol (`Type=notify`): `READY=1` once it accepts MQTT
//! connections, `STOPPING=1` when a SIGTERM starts the orderly stop.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests and benchmarks: a failure is the test's failure"
)]

mod support;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;

use support::raw::RawClient;
use support::{TestBroker, TIMEOUT};

const UNIT: &str = include_str!("../config/shardmq.service");

#[test]
fn the_unit_file_passes_systemd_analyze_verify() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bin = env!("CARGO_BIN_EXE_shardmq");
    let exec = UNIT
        .lines()
        .find(|l| l.starts_with("ExecStart=/usr/local/bin/shardmq "))
        .expect("the unit starts /usr/local/bin/shardmq");
    // The installed path does not exist here: point ExecStart at the binary under test.
    let unit = UNIT.replace(exec, &exec.replace("/usr/local/bin/shardmq", bin));
    let path = dir.path().join("shardmq.service");
    std::fs::write(&path, unit).expect("write unit");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run systemd-analyze (Debian package systemd; .ci/run installs it): {e}")
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{text}"
    );
    let about_unit: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("shardmq.service") || l.contains(&*path.to_string_lossy()))
        .collect();
    assert!(
        about_unit.is_empty(),
        "systemd-analyze verify warns about the unit:\n{}",
        about_unit.join("\n")
    );
}

/// The next notification on `sock`, within TIMEOUT.
fn next_notification(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    sock.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    let n = sock
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("no notification from the broker within {TIMEOUT:?}: {e}"));
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

fn notify_socket(dir: &Path) -> (UnixDatagram, String) {
    let path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&path).expect("bind the notify socket");
    (sock, path.to_str().expect("utf-8 path").to_owned())
}

#[test]
fn ready_once_it_accepts_connections_and_stopping_on_sigterm() {
    let sockdir = tempfile::tempdir().expect("temp dir");
    let (sock, path) = notify_socket(sockdir.path());
    let data = tempfile::tempdir().expect("temp dir");
    let b = TestBroker::start_env(2, "", data, &[("NOTIFY_SOCKET", &path)], None);
    assert_eq!(
        next_notification(&sock).lines().collect::<Vec<_>>(),
        ["READY=1"]
    );
    // READY means it serves: a client connects at once.
    let mut c = RawClient::connect_v311(b.addr, "notify-client");
    c.ping();
    b.signal(libc::SIGTERM);
    assert_eq!(
        next_notification(&sock).lines().collect::<Vec<_>>(),
        ["STOPPING=1"]
    );
    assert_eq!(b.wait().code(), Some(0));
}
