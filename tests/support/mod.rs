//! Starts the real `shardmq` binary for a test: its own ephemeral port on 127.0.0.1, its own
//! temporary data directory, and the ready line on stdout as the signal that every shard
//! listens. The broker is stopped (by its PID) when the handle drops.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test support: a failure is a test failure"
)]
#![allow(dead_code)]

pub mod browser;
pub mod cluster;
pub mod crash;
pub mod etcd;
pub mod nats;
pub mod raw;

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant};

/// Generous bound for anything a test waits for; never a synchronisation point.
pub const TIMEOUT: Duration = Duration::from_secs(20);

pub struct TestBroker {
    child: Option<Child>,
    pub addr: SocketAddr,
    /// The admin endpoint (on its own ephemeral port), unless the config turned it off.
    pub admin: Option<SocketAddr>,
    pub shards: usize,
    pub data_dir: tempfile::TempDir,
    /// The whole ready line (`listeners=... shards=N tcp=... tls=...`).
    pub ready_line: String,
    /// The broker's stderr, line by line, when started with [`TestBroker::start_logged`].
    pub log: Option<mpsc::Receiver<String>>,
}

impl TestBroker {
    /// A broker with `shards` unpinned shards and the default configuration.
    pub fn start(shards: usize) -> TestBroker {
        TestBroker::start_with(shards, "")
    }

    /// A broker with `shards` shards and extra TOML appended to the generated config.
    pub fn start_with(shards: usize, extra_toml: &str) -> TestBroker {
        let data_dir = tempfile::tempdir().expect("temp dir");
        TestBroker::start_in(shards, extra_toml, data_dir)
    }

    /// Starts a broker on an existing data directory (restart tests).
    pub fn start_in(shards: usize, extra_toml: &str, data_dir: tempfile::TempDir) -> TestBroker {
        TestBroker::start_env(shards, extra_toml, data_dir, &[], None)
    }

    /// A broker whose stderr, with the log filter `rust_log`, is kept for [`TestBroker::wait_log`].
    pub fn start_logged(shards: usize, extra_toml: &str, rust_log: &str) -> TestBroker {
        let data_dir = tempfile::tempdir().expect("temp dir");
        TestBroker::launch(shards, extra_toml, data_dir, &[], None, Some(rust_log))
    }

    /// Starts a broker with extra environment variables (`NOTIFY_SOCKET`, say) and, with
    /// `log_file`, its stderr (the log) going to that file instead of the test's stderr.
    pub fn start_env(
        shards: usize,
        extra_toml: &str,
        data_dir: tempfile::TempDir,
        envs: &[(&str, &str)],
        log_file: Option<&std::path::Path>,
    ) -> TestBroker {
        TestBroker::launch(shards, extra_toml, data_dir, envs, log_file, None)
    }

    /// With `rust_log`, the log (at that filter) is piped for [`TestBroker::wait_log`].
    fn launch(
        shards: usize,
        extra_toml: &str,
        data_dir: tempfile::TempDir,
        envs: &[(&str, &str)],
        log_file: Option<&std::path::Path>,
        rust_log: Option<&str>,
    ) -> TestBroker {
        let stderr = match (log_file, rust_log) {
            (Some(p), _) => Stdio::from(std::fs::File::create(p).expect("create log file")),
            (None, Some(_)) => Stdio::piped(),
            (None, None) => Stdio::inherit(),
        };
        let cfg_path = data_dir.path().join("test.toml");
        std::fs::write(&cfg_path, extra_toml).expect("write config");
        let mut child = Command::new(env!("CARGO_BIN_EXE_shardmq"))
            .envs(envs.iter().copied())
            .arg("--config")
            .arg(&cfg_path)
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .args(["--no-pin", "--shards"])
            .arg(shards.to_string())
            .arg("--data-dir")
            .arg(data_dir.path().join("data"))
            .env(
                "RUST_LOG",
                rust_log.map(str::to_string).unwrap_or_else(|| {
                    std::env::var("SHARDMQ_TEST_LOG").unwrap_or_else(|_| "warn".into())
                }),
            )
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn shardmq");
        let log = child.stderr.take().map(|stderr| {
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    eprintln!("{line}");
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
            rx
        });
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("shardmq ready") {
                    let _ = tx.send(line);
                }
            }
        });
        let line = match rx.recv_timeout(TIMEOUT) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                panic!("broker did not report ready within {TIMEOUT:?}");
            }
        };
        let addr = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("listeners="))
            .and_then(|l| l.split(',').next())
            .and_then(|a| a.parse().ok())
            .expect("listener address in the ready line");
        let admin = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("admin="))
            .map(|a| a.parse().expect("admin address in the ready line"));
        TestBroker {
            child: Some(child),
            addr,
            admin,
            shards,
            data_dir,
            ready_line: line,
            log,
        }
    }

    /// The first address the ready line gives for `transport` (`tcp`, `tls`, `ws`, `wss`).
    pub fn listener(&self, transport: &str) -> SocketAddr {
        let key = format!("{transport}=");
        self.ready_line
            .split_whitespace()
            .find_map(|w| w.strip_prefix(key.as_str()))
            .and_then(|l| l.split(',').next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no {transport} listener in {:?}", self.ready_line))
    }

    /// Waits (bounded) for a log line containing every one of `parts`; returns it.
    pub fn wait_log(&self, parts: &[&str]) -> String {
        let rx = self.log.as_ref().expect("started with start_logged");
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) if parts.iter().all(|p| l.contains(p)) => return l,
                Ok(_) => {}
                Err(_) => panic!("no log line with {parts:?} within {TIMEOUT:?}"),
            }
        }
    }

    /// An HTTP request to the admin endpoint: the status and the body (4xx/5xx included).
    pub fn http(&self, method: &str, path: &str) -> (u16, String) {
        self.http_with(method, path, &[])
    }

    /// [`TestBroker::http`] with extra request headers.
    pub fn http_with(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
        let admin = self.admin.expect("the ready line names the admin endpoint");
        let url = format!("http://{admin}{path}");
        let agent = ureq::AgentBuilder::new().timeout(TIMEOUT).build();
        let mut req = agent.request(method, &url);
        for (name, value) in headers {
            req = req.set(name, value);
        }
        match req.call() {
            Ok(r) => (r.status(), r.into_string().expect("body")),
            Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap_or_default()),
            Err(e) => panic!("{method} {url}: {e}"),
        }
    }

    /// The value of one series in `/metrics`, named with its labels exactly as the broker
    /// writes them (`shardmq_x_total{shard="0"}`); panics, showing the text, when absent.
    pub fn metric(&self, series: &str) -> f64 {
        let (_, text) = self.http("GET", "/metrics");
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in /metrics:\n{text}"))
    }

    /// GET from the admin API, asserting 200 and a JSON body.
    pub fn admin_json(&self, path: &str) -> serde_json::Value {
        let (status, body) = self.http("GET", path);
        assert_eq!(status, 200, "GET {path}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Sends `signal` (SIGTERM, SIGINT...) to the broker and returns at once.
    pub fn signal(&self, signal: i32) {
        // SAFETY: signalling the child we spawned, by its PID.
        unsafe { libc::kill(self.pid() as i32, signal) };
    }

    /// Waits (bounded) for the broker to exit; returns its status.
    pub fn wait(mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        wait_bounded(&mut child)
    }

    /// CPU time the broker has used (user + system, from /proc/PID/stat).
    pub fn cpu(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))
            .expect("read /proc/PID/stat");
        // Fields after the command name (which may hold spaces) in parentheses.
        let after = &stat[stat.rfind(')').expect("comm") + 2..];
        let fields: Vec<&str> = after.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of the whole line, 12 and 13 here.
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
        Duration::from_millis(ticks * 1000 / hz.max(1))
    }

    /// The broker's resident memory (VmRSS from /proc/PID/status), in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/PID/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }

    /// How many file descriptors the broker holds open (/proc/PID/fd).
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .expect("read /proc/PID/fd")
            .count()
    }

    /// Waits (bounded by TIMEOUT) until the broker holds at most `fds` descriptors; returns
    /// the last count seen.
    pub fn wait_fds_at_most(&self, fds: usize) -> usize {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let n = self.fd_count();
            if n <= fds || Instant::now() > deadline {
                return n;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then wait (bounded) for the exit status.
    pub fn stop(mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        // SAFETY: signalling the child we spawned, by its PID.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        wait_bounded(&mut child)
    }

    /// SIGTERM, then wait (bounded) for a successful exit; returns the data directory for
    /// a restart.
    pub fn stop_keep_dir(mut self) -> tempfile::TempDir {
        let mut child = self.child.take().expect("running");
        // SAFETY: signalling the child we spawned, by its PID.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = wait_bounded(&mut child);
        assert!(status.success(), "broker exit status {status}");
        std::mem::replace(&mut self.data_dir, tempfile::tempdir().expect("temp dir"))
    }

    /// SIGKILL (a crash); returns the data directory for a restart.
    pub fn kill9(mut self) -> tempfile::TempDir {
        let mut child = self.child.take().expect("running");
        let _ = child.kill();
        let _ = child.wait();
        std::mem::replace(&mut self.data_dir, tempfile::tempdir().expect("temp dir"))
    }
}

fn wait_bounded(child: &mut Child) -> ExitStatus {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(s) = child.try_wait().expect("wait") {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("broker did not exit within {TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The shard that owns `client_id` (the broker's own function).
pub fn owner(client_id: &str, shards: usize) -> usize {
    shardmq::session::owner_shard(client_id.as_bytes(), shards)
}

/// A client id starting with `prefix` that the broker places on `shard`.
pub fn id_on_shard(prefix: &str, shard: usize, shards: usize) -> String {
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .find(|id| owner(id, shards) == shard)
        .expect("some id lands on every shard")
}

/// The shared tokio runtime that drives rumqttc clients from synchronous tests.
pub fn rt() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime")
    })
}

/// A topic name starting with `prefix` whose retained messages live on `shard`.
pub fn topic_on_shard(prefix: &str, shard: usize, shards: usize) -> String {
    (0..)
        .map(|i| format!("{prefix}/{i}"))
        .find(|t| owner(t, shards) == shard)
        .expect("some topic lands on every shard")
}

/// A channel of the packets an incoming rumqttc event loop yields
/// (outgoing events skipped, the first error sent as text and ending it).
pub type Incoming = mpsc::Receiver<Result<rumqttc::Packet, String>>;

/// Polls `el` on [`rt`] until it fails or the receiver is dropped.
pub fn drive_event_loop(mut el: rumqttc::EventLoop) -> (Incoming, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel();
    let task = rt().spawn(async move {
        loop {
            match el.poll().await {
                Ok(rumqttc::Event::Incoming(p)) => {
                    if tx.send(Ok(p)).is_err() {
                        break;
                    }
                }
                Ok(rumqttc::Event::Outgoing(_)) => {}
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    break;
                }
            }
        }
    });
    (rx, task)
}

/// Runs the `shardmq` binary with `args` to completion (bounded by [`TIMEOUT`]), with the
/// default log filter (`RUST_LOG` removed). The admin endpoint gets an ephemeral port
/// unless `args` name one, so that no run takes the default 8080 (tests run in parallel).
pub fn run_to_exit(args: &[&str]) -> Output {
    let admin: &[&str] = if args.contains(&"--admin-listen") {
        &[]
    } else {
        &["--admin-listen", "127.0.0.1:0"]
    };
    let child = Command::new(env!("CARGO_BIN_EXE_shardmq"))
        .args(admin)
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn shardmq");
    wait_output(child)
}

/// Waits (bounded by [`TIMEOUT`]) for a spawned `shardmq` with piped stdout and stderr to
/// exit and returns its output; kills it and panics if it does not exit in time.
pub fn wait_output(mut child: Child) -> Output {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let mut stdout = Vec::new();
            let mut stderr = Vec::new();
            child.stdout.take().map(|mut s| s.read_to_end(&mut stdout));
            child.stderr.take().map(|mut s| s.read_to_end(&mut stderr));
            return Output {
                status,
                stdout,
                stderr,
            };
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("shardmq did not exit within {TIMEOUT:?}");
        }
        // Polling a child's exit status; not a synchronisation point.
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Takes the piped stdout of `child` and sends it, line by line, from a thread of its own
/// (which stops at end of file or when the receiver is dropped).
pub fn stdout_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().expect("stdout");
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    lines
}
