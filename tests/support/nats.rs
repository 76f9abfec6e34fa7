//! A real NATS JetStream cluster for a test: `n` servers (the Debian `nats-server` binary)
//! on ephemeral 127.0.0.1 ports with a temporary directory each, stopped by PID on drop.

use std::io::Read;
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::etcd::free_ports;
use super::TIMEOUT;

pub struct NatsServer {
    pub name: String,
    pub client_port: u16,
    pub route_port: u16,
    pub http_port: u16,
    child: Option<Child>,
}

impl NatsServer {
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.client_port)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Sends `signal` (SIGSTOP, SIGCONT) to the server.
    pub fn signal(&self, signal: i32) {
        if let Some(c) = &self.child {
            // SAFETY: a plain kill(2) of a child this test started.
            unsafe { libc::kill(c.id() as i32, signal) };
        }
    }

    /// SIGKILL, and wait for the process to go.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A monitoring endpoint's body (`/jsz?streams=1`, say).
    pub fn monitor(&self, path: &str) -> Option<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.http_port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        std::io::Write::write_all(
            &mut s,
            format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes(),
        )
        .ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).ok()?;
        body.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
    }
}

pub struct Nats {
    pub servers: Vec<NatsServer>,
    pub dir: tempfile::TempDir,
}

impl Nats {
    /// Starts `n` JetStream servers in one cluster and waits until every one says it is
    /// healthy (JetStream up, a meta leader elected).
    pub fn start(n: usize) -> Nats {
        Nats::start_with(n, "")
    }

    /// As [`Nats::start`], with `extra` added to every server's configuration.
    pub fn start_with(n: usize, extra: &str) -> Nats {
        for attempt in 0..3 {
            if let Some(s) = Nats::try_start(n, extra) {
                return s;
            }
            eprintln!("NATS did not come up (attempt {attempt}); retrying on other ports");
        }
        panic!("NATS did not start");
    }

    fn try_start(n: usize, extra: &str) -> Option<Nats> {
        let dir = tempfile::tempdir().expect("temp dir");
        let ports = free_ports(3 * n);
        let mut servers: Vec<NatsServer> = (0..n)
            .map(|i| NatsServer {
                name: format!("n{i}"),
                client_port: ports[3 * i],
                route_port: ports[3 * i + 1],
                http_port: ports[3 * i + 2],
                child: None,
            })
            .collect();
        let routes: Vec<String> = servers
            .iter()
            .map(|s| format!("\"nats-route://127.0.0.1:{}\"", s.route_port))
            .collect();
        for s in &mut servers {
            let store = dir.path().join(&s.name);
            let conf = dir.path().join(format!("{}.conf", s.name));
            let cluster = if n > 1 {
                format!(
                    "cluster {{\n  name: shardmq-test\n  listen: 127.0.0.1:{}\n  routes: [{}]\n}}\n",
                    s.route_port,
                    routes.join(", ")
                )
            } else {
                String::new()
            };
            std::fs::write(
                &conf,
                format!(
                    "server_name: {}\nlisten: 127.0.0.1:{}\nhttp: 127.0.0.1:{}\njetstream {{\n  store_dir: \"{}\"\n}}\n{cluster}{extra}",
                    s.name,
                    s.client_port,
                    s.http_port,
                    store.display()
                ),
            )
            .expect("write nats config");
            let log = std::fs::File::create(dir.path().join(format!("{}.log", s.name)))
                .expect("log file");
            let child = Command::new("nats-server")
                .arg("-c")
                .arg(&conf)
                .stdout(Stdio::null())
                .stderr(Stdio::from(log))
                .spawn()
                .expect("spawn nats-server (apt install nats-server)");
            s.child = Some(child);
        }
        let nats = Nats { servers, dir };
        nats.wait_healthy().then_some(nats)
    }

    fn wait_healthy(&self) -> bool {
        let deadline = Instant::now() + TIMEOUT;
        while Instant::now() < deadline {
            let all = self
                .servers
                .iter()
                .all(|s| s.monitor("/healthz").is_some_and(|b| b.contains("\"ok\"")));
            if all {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    /// Every server's URL, as a TOML array's items.
    pub fn toml_urls(&self) -> String {
        self.servers
            .iter()
            .map(|s| format!("\"{}\"", s.url()))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Deletes the stream `name` and makes it again with the same configuration (as if
    /// NATS had lost it), then appends `n` messages to a subject of it that nobody reads, so
    /// that it ends at sequence `n` again.
    #[allow(dead_code)]
    pub fn remake_stream(&self, name: &str, n: u64) {
        use async_nats::jetstream;
        let url = self.servers[0].url();
        let name = name.to_string();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let client = async_nats::connect(url).await.expect("connect to NATS");
            let js = jetstream::new(client);
            let mut stream = js.get_stream(&name).await.expect("the stream");
            let config = stream.info().await.expect("its info").config.clone();
            js.delete_stream(&name).await.expect("delete it");
            js.create_stream(config.clone())
                .await
                .expect("make it again");
            let all = config.subjects[0].clone();
            let filler = format!("{}filler", all.trim_end_matches('>').trim_end_matches('*'));
            for i in 0..n {
                js.publish(filler.clone(), format!("filler {i}").into())
                    .await
                    .expect("publish")
                    .await
                    .expect("stored");
            }
        });
    }

    /// The stream `name`'s details (`state`, `cluster`, ...) as a live server's monitoring
    /// endpoint shows them.
    pub fn stream(&self, name: &str) -> Option<serde_json::Value> {
        for s in self.servers.iter().filter(|s| s.is_running()) {
            let Some(body) = s.monitor("/jsz?streams=1") else {
                continue;
            };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&body) else {
                continue;
            };
            for a in v["account_details"].as_array().cloned().unwrap_or_default() {
                for st in a["stream_detail"].as_array().cloned().unwrap_or_default() {
                    if st["name"] == name {
                        return Some(st);
                    }
                }
            }
        }
        None
    }

    /// The server leading the stream `name` (by the monitoring endpoint of a live one).
    pub fn stream_leader(&self, name: &str) -> Option<usize> {
        for s in self.servers.iter().filter(|s| s.is_running()) {
            let Some(body) = s.monitor("/jsz?streams=1") else {
                continue;
            };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&body) else {
                continue;
            };
            let accounts = v["account_details"].as_array().cloned().unwrap_or_default();
            for a in accounts {
                for st in a["stream_detail"].as_array().cloned().unwrap_or_default() {
                    if st["name"] == name {
                        if let Some(leader) = st["cluster"]["leader"].as_str() {
                            return self.servers.iter().position(|x| x.name == leader);
                        }
                    }
                }
            }
        }
        None
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        for s in &mut self.servers {
            s.kill9();
        }
    }
}

/// A NATS operator (decentralised JWT authentication) for tests: the servers' configuration
/// (the operator's JWT, a system account and one account with JetStream, preloaded in a
/// memory resolver) and credentials files for users of that account.
#[allow(dead_code)]
pub struct Operator {
    pub server_conf: String,
    account: nkeys::KeyPair,
}

#[allow(dead_code)]
impl Operator {
    pub fn new() -> Operator {
        let operator = nkeys::KeyPair::new_operator();
        let system = nkeys::KeyPair::new_account();
        let account = nkeys::KeyPair::new_account();
        let op_jwt = jwt(
            &operator,
            &operator.public_key(),
            "test-operator",
            serde_json::json!({
                "system_account": system.public_key(),
                "type": "operator",
                "version": 2
            }),
        );
        let limits = |js: bool| {
            let mut l = serde_json::json!({
                "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
                "wildcards": true, "conn": -1, "leaf": -1
            });
            if js {
                for k in ["mem_storage", "disk_storage", "streams", "consumer"] {
                    l[k] = serde_json::json!(-1);
                }
            }
            l
        };
        let account_jwt = |kp: &nkeys::KeyPair, name: &str, js: bool| {
            jwt(
                &operator,
                &kp.public_key(),
                name,
                serde_json::json!({
                    "limits": limits(js),
                    "default_permissions": { "pub": {}, "sub": {} },
                    "type": "account",
                    "version": 2
                }),
            )
        };
        let server_conf = format!(
            "operator: {:?}\nsystem_account: {:?}\nresolver: MEMORY\nresolver_preload: {{\n  {:?}: {:?}\n  {:?}: {:?}\n}}\n",
            op_jwt,
            system.public_key(),
            system.public_key(),
            account_jwt(&system, "SYS", false),
            account.public_key(),
            account_jwt(&account, "shardmq", true),
        );
        Operator {
            server_conf,
            account,
        }
    }

    /// A credentials file's text for a new user of the account.
    pub fn user_creds(&self, name: &str) -> String {
        let user = nkeys::KeyPair::new_user();
        self.creds_for(&self.account, &user, name)
    }

    /// A credentials file's text for a user signed by an account the servers do not know.
    pub fn stranger_creds(&self) -> String {
        let account = nkeys::KeyPair::new_account();
        let user = nkeys::KeyPair::new_user();
        self.creds_for(&account, &user, "stranger")
    }

    fn creds_for(&self, account: &nkeys::KeyPair, user: &nkeys::KeyPair, name: &str) -> String {
        let token = jwt(
            account,
            &user.public_key(),
            name,
            serde_json::json!({
                "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1,
                "type": "user", "version": 2
            }),
        );
        format!(
            "-----BEGIN NATS USER JWT-----\n{token}\n------END NATS USER JWT------\n\n\
             ************************* IMPORTANT *************************\n\
             NKEY Seed printed below can be used to sign and prove identity.\n\n\
             -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
            user.seed().expect("seed")
        )
    }
}

/// A NATS JWT (v2): `claims` under `nats`, issued by `issuer` for `subject`, signed with
/// the issuer's key.
fn jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    use base64::Engine;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let iat = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let claims = serde_json::json!({
        "jti": format!("{}{iat}", &subject[..12]),
        "iat": iat,
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let signed = format!(
        "{}.{}",
        b64(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#),
        b64(claims.to_string().as_bytes())
    );
    let sig = issuer.sign(signed.as_bytes()).expect("sign");
    format!("{signed}.{}", b64(&sig))
}
