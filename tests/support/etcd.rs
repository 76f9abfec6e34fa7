//! A real etcd cluster for a test: `n` members (the Debian `etcd-server` binary) on
//! ephemeral 127.0.0.1 ports with a temporary directory each, stopped by PID on drop.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::TIMEOUT;

pub struct EtcdMember {
    pub name: String,
    pub client_port: u16,
    pub peer_port: u16,
    child: Option<Child>,
}

impl EtcdMember {
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, and wait for the process to go.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub struct Etcd {
    pub members: Vec<EtcdMember>,
    pub dir: tempfile::TempDir,
}

/// Ports nobody listens on right now (bound and released; etcd takes them right after).
pub fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    held.iter()
        .map(|l| l.local_addr().expect("addr").port())
        .collect()
}

impl Etcd {
    /// Starts `n` members and waits until the cluster answers.
    pub fn start(n: usize) -> Etcd {
        for attempt in 0..3 {
            if let Some(e) = Etcd::try_start(n) {
                return e;
            }
            eprintln!("etcd did not come up (attempt {attempt}); retrying on other ports");
        }
        panic!("etcd did not start");
    }

    fn try_start(n: usize) -> Option<Etcd> {
        let dir = tempfile::tempdir().expect("temp dir");
        let ports = free_ports(2 * n);
        let mut members: Vec<EtcdMember> = (0..n)
            .map(|i| EtcdMember {
                name: format!("e{i}"),
                client_port: ports[2 * i],
                peer_port: ports[2 * i + 1],
                child: None,
            })
            .collect();
        let initial: Vec<String> = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect();
        let token = format!("t{}", std::process::id());
        for m in &mut members {
            let data = dir.path().join(&m.name);
            let log = std::fs::File::create(dir.path().join(format!("{}.log", m.name)))
                .expect("log file");
            let child = Command::new("etcd")
                .arg("--name")
                .arg(&m.name)
                .arg("--data-dir")
                .arg(&data)
                .arg("--listen-client-urls")
                .arg(m.url())
                .arg("--advertise-client-urls")
                .arg(m.url())
                .arg("--listen-peer-urls")
                .arg(format!("http://127.0.0.1:{}", m.peer_port))
                .arg("--initial-advertise-peer-urls")
                .arg(format!("http://127.0.0.1:{}", m.peer_port))
                .arg("--initial-cluster")
                .arg(initial.join(","))
                .args(["--initial-cluster-state", "new"])
                .arg("--initial-cluster-token")
                .arg(&token)
                .args(["--logger", "zap", "--log-outputs", "stderr"])
                .stdout(Stdio::null())
                .stderr(Stdio::from(log))
                .spawn()
                .expect("spawn etcd (apt install etcd-server)");
            m.child = Some(child);
        }
        let etcd = Etcd { members, dir };
        etcd.wait_healthy().then_some(etcd)
    }

    /// Every member's client URL, comma-separated.
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(EtcdMember::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The live members' URLs.
    fn live_endpoints(&self) -> String {
        self.members
            .iter()
            .filter(|m| m.child.is_some())
            .map(EtcdMember::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Waits until every live member reports healthy (a leader is elected).
    pub fn wait_healthy(&self) -> bool {
        let deadline = Instant::now() + TIMEOUT * 2;
        while Instant::now() < deadline {
            let ok = Command::new("etcdctl")
                .arg("--endpoints")
                .arg(self.live_endpoints())
                .args(["--command-timeout", "2s", "endpoint", "health"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return true;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        false
    }

    /// The index of the member that is the raft leader now.
    pub fn leader(&self) -> usize {
        let deadline = Instant::now() + TIMEOUT;
        while Instant::now() < deadline {
            let out = Command::new("etcdctl")
                .arg("--endpoints")
                .arg(self.live_endpoints())
                .args([
                    "--command-timeout",
                    "2s",
                    "endpoint",
                    "status",
                    "-w",
                    "json",
                ])
                .output()
                .expect("etcdctl");
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) {
                for s in v.as_array().into_iter().flatten() {
                    let member = s["Status"]["header"]["member_id"].as_u64();
                    let leader = s["Status"]["leader"].as_u64();
                    if member.is_some() && member == leader {
                        let ep = s["Endpoint"].as_str().unwrap_or_default();
                        if let Some(i) = self.members.iter().position(|m| m.url() == ep) {
                            return i;
                        }
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("no etcd leader within {TIMEOUT:?}");
    }

    /// Reads one key's value with etcdctl.
    pub fn get(&self, key: &str) -> Option<String> {
        let out = Command::new("etcdctl")
            .arg("--endpoints")
            .arg(self.live_endpoints())
            .args(["--command-timeout", "5s", "get", "--print-value-only", key])
            .output()
            .expect("etcdctl");
        let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (out.status.success() && !s.is_empty()).then_some(s)
    }

    /// Puts a key with etcdctl (a hostile or mistaken operator).
    pub fn put(&self, key: &str, value: &str) {
        let ok = Command::new("etcdctl")
            .arg("--endpoints")
            .arg(self.live_endpoints())
            .args(["--command-timeout", "5s", "put", key, value])
            .stdout(Stdio::null())
            .status()
            .expect("etcdctl")
            .success();
        assert!(ok, "etcdctl put {key}");
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for m in &mut self.members {
            m.kill9();
        }
    }
}
