//! Log levels: `--log-level` over `RUST_LOG` over the config's `log.level`; an invalid level
//! from any of them stops the start with one line naming where it came from.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests and benchmarks: a failure is the test's failure"
)]

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_shardmq");
const TIMEOUT: Duration = Duration::from_secs(20);
/// An info-level line the broker logs before its ready line.
const INFO_LINE: &str = "listening on";

/// Runs the broker until its ready line, stops it (SIGTERM) and returns its stderr.
/// `config_level` goes to `[log] level`, `rust_log` to RUST_LOG, `flag` to `--log-level`.
fn logs(config_level: &str, rust_log: Option<&str>, flag: Option<&str>) -> String {
    let dir = tempfile::tempdir().expect("temp dir");
    let cfg = dir.path().join("shardmq.toml");
    std::fs::write(&cfg, format!("[log]\nlevel = {config_level:?}\n")).expect("config");
    let mut cmd = Command::new(BIN);
    cmd.arg("--config")
        .arg(&cfg)
        .args(["--listen", "127.0.0.1:0", "--no-pin", "--shards", "1"])
        .args(["--admin-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(v) = rust_log {
        cmd.env("RUST_LOG", v);
    }
    if let Some(f) = flag {
        cmd.args(["--log-level", f]);
    }
    let mut child = cmd.spawn().expect("spawn shardmq");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.starts_with("shardmq ready") {
                let _ = tx.send(());
            }
        }
    });
    let mut stderr = child.stderr.take().expect("stderr");
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    if rx.recv_timeout(TIMEOUT).is_err() {
        let _ = child.kill();
        let _ = child.wait();
        panic!("no ready line; stderr: {}", err.join().unwrap_or_default());
    }
    // SAFETY: signalling the child we spawned, by its PID.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().expect("wait");
    let text = err.join().expect("stderr reader");
    assert!(status.success(), "exit {status}; stderr: {text}");
    text
}

#[test]
fn the_flag_wins_over_rust_log_which_wins_over_the_config() {
    // The config alone.
    assert!(logs("info", None, None).contains(INFO_LINE));
    assert!(!logs("warn", None, None).contains(INFO_LINE));
    // RUST_LOG over the config, both ways.
    assert!(logs("warn", Some("info"), None).contains(INFO_LINE));
    assert!(!logs("info", Some("warn"), None).contains(INFO_LINE));
    // The flag over both, both ways.
    assert!(logs("warn", Some("warn"), Some("info")).contains(INFO_LINE));
    assert!(!logs("info", Some("info"), Some("error")).contains(INFO_LINE));
    // A filter with targets.
    assert!(logs("warn", None, Some("warn,shardmq=info")).contains(INFO_LINE));
}

/// Runs to completion a start that must fail; returns (exit code, stderr).
fn failed_start(args: &[&str], rust_log: Option<&str>) -> (Option<i32>, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    if let Some(v) = rust_log {
        cmd.env("RUST_LOG", v);
    }
    let out = cmd.output().expect("run shardmq");
    assert!(out.stdout.is_empty(), "no ready line");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_one_line_naming(code: Option<i32>, stderr: &str, names: &[&str]) {
    assert_eq!(code, Some(2), "exit status; stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {lines:#?}");
    for n in names {
        assert!(lines[0].contains(n), "{:?} should name {n:?}", lines[0]);
    }
}

#[test]
fn an_invalid_level_is_one_line_naming_it_and_its_source() {
    let (code, err) = failed_start(&["--log-level", "verbose"], None);
    assert_one_line_naming(code, &err, &["--log-level", "\"verbose\""]);

    let (code, err) = failed_start(&["--log-level", "info,shardmq=loud"], None);
    assert_one_line_naming(code, &err, &["--log-level", "\"loud\""]);

    let (code, err) = failed_start(&[], Some("chatty"));
    assert_one_line_naming(code, &err, &["RUST_LOG", "\"chatty\""]);

    let dir = tempfile::tempdir().expect("temp dir");
    let cfg = dir.path().join("shardmq.toml");
    std::fs::write(&cfg, "[log]\nlevel = \"noisy\"\n").expect("config");
    let (code, err) = failed_start(&["--config", cfg.to_str().expect("utf-8")], None);
    assert_one_line_naming(code, &err, &["log.level", "\"noisy\""]);
}

/// What an operator reads at the default level: no storage-engine internals, a line per
/// connect and disconnect with the client's id, address and user, and a last line saying the
/// broker stopped and how long that took.
#[test]
fn the_default_log_has_connections_and_a_stop_line_but_no_storage_internals() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cfg = dir.path().join("shardmq.toml");
    std::fs::write(&cfg, "[log]\nlevel = \"info\"\n").expect("config");
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(&cfg)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--no-pin",
            "--shards",
            "2",
            "--no-admin",
        ])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn shardmq");
    let stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in stdout.lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let ready = rx.recv_timeout(TIMEOUT).expect("ready line");
    let addr: std::net::SocketAddr = ready
        .split_whitespace()
        .find_map(|w| w.strip_prefix("listeners="))
        .and_then(|l| l.split(',').next())
        .and_then(|a| a.parse().ok())
        .expect("listener address");
    // One client in and out (CONNECT, then DISCONNECT), as a raw 3.1.1 client.
    {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        s.write_all(b"\x10\x13\x00\x04MQTT\x04\x02\x00\x00\x00\x07visitor")
            .unwrap();
        let mut connack = [0u8; 4];
        s.read_exact(&mut connack).unwrap();
        s.write_all(b"\xe0\x00").unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    }
    // SAFETY: signalling the child we spawned, by its PID.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(child.wait().expect("wait").success(), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(
        lines.iter().any(|l| l.contains("client connected")
            && l.contains("visitor")
            && l.contains("127.0.0.1")),
        "{stderr}"
    );
    assert!(
        lines.iter().any(|l| l.contains("client disconnected")
            && l.contains("visitor")
            && l.contains("DISCONNECT")),
        "{stderr}"
    );
    assert!(
        !lines
            .iter()
            .any(|l| l.contains("fjall") || l.contains("lsm_tree")),
        "storage internals at info: {stderr}"
    );
    assert!(
        lines
            .last()
            .is_some_and(|l| l.contains("stopped") && l.contains("ms=")),
        "the last line says it stopped: {stderr}"
    );
    assert!(!stderr.contains('\x1b'), "no colour codes in a piped log");
}
