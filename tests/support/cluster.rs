//! Cluster nodes for a test: the `[cluster]` config of a node, waits on what its admin
//! endpoint shows.

use std::time::{Duration, Instant};

use serde_json::Value;

use super::etcd::Etcd;
use super::{TestBroker, TIMEOUT};

/// The lease the tests give their nodes: short, so that deaths are seen quickly.
pub const TTL_S: u64 = 3;

pub fn node_toml(id: &str, etcd: &Etcd, prefix: &str) -> String {
    node_toml_ttl(id, etcd, prefix, TTL_S)
}

pub fn node_toml_ttl(id: &str, etcd: &Etcd, prefix: &str, ttl_s: u64) -> String {
    let urls: Vec<String> = etcd
        .members
        .iter()
        .map(|m| format!("\"{}\"", m.url()))
        .collect();
    format!(
        "[cluster]\nnode = \"{id}\"\nlisten = \"127.0.0.1:0\"\netcd = [{}]\nprefix = \"{prefix}\"\nlease_ttl_s = {ttl_s}\n",
        urls.join(", ")
    )
}

pub fn start_node(id: &str, etcd: &Etcd, prefix: &str) -> TestBroker {
    TestBroker::start_with(1, &node_toml(id, etcd, prefix))
}

/// Polls `f` until it holds; panics with `what` after a generous bound.
pub fn wait_until(what: &str, bound: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + bound;
    while !f() {
        assert!(Instant::now() < deadline, "not within {bound:?}: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn member<'a>(view: &'a Value, id: &str) -> &'a Value {
    view["members"]
        .as_array()
        .expect("members")
        .iter()
        .find(|m| m["id"] == id)
        .unwrap_or_else(|| panic!("no member {id} in {view}"))
}

/// A field of member `id` as `node` sees it (`state`, `link/state`), or "" when absent.
fn member_field(node: &TestBroker, id: &str, path: &[&str]) -> String {
    let v = node.admin_json("/api/cluster");
    v["members"]
        .as_array()
        .expect("members")
        .iter()
        .find(|m| m["id"] == id)
        .map(|m| path.iter().fold(m, |x, k| &x[*k]))
        .and_then(|x| x.as_str().map(str::to_string))
        .unwrap_or_default()
}

pub fn member_state(node: &TestBroker, id: &str) -> String {
    member_field(node, id, &["state"])
}

pub fn link_state(node: &TestBroker, id: &str) -> String {
    member_field(node, id, &["link", "state"])
}

pub fn prefix(test: &str) -> String {
    format!("/shardmq-test-{test}-{}", std::process::id())
}

/// Three nodes `a`, `b`, `c` with one shard each, started in order, returned once every
/// node sees every other up with a live link and the slots are shared out evenly.
pub fn three_nodes(etcd: &Etcd, prefix: &str) -> [TestBroker; 3] {
    // The default lease: a loaded machine (etcd fsyncs each renewal) must not make a
    // node refuse clients for a late keep-alive.
    let nodes = [
        TestBroker::start_with(1, &node_toml_ttl("a", etcd, prefix, 6)),
        TestBroker::start_with(1, &node_toml_ttl("b", etcd, prefix, 6)),
        TestBroker::start_with(1, &node_toml_ttl("c", etcd, prefix, 6)),
    ];
    wait_linked(&[&nodes[0], &nodes[1], &nodes[2]]);
    wait_balanced(&nodes[0], &["a", "b", "c"]);
    nodes
}

/// Waits until `node` sees the slots shared out evenly (within two) among `ids`.
pub fn wait_balanced(node: &TestBroker, ids: &[&str]) {
    let fair = 4096 / ids.len() as u64;
    let (floor, ceil) = (fair, 4096u64.div_ceil(ids.len() as u64));
    wait_until("the slots shared out", TIMEOUT, || {
        let v = node.admin_json("/api/cluster");
        let slots = |id: &str| {
            v["members"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["id"] == id)
                .and_then(|m| m["slots"].as_u64())
        };
        let counts: Vec<u64> = ids.iter().filter_map(|id| slots(id)).collect();
        // Shared out, and settled: no member has more than its share while another has
        // less (the rebalance would move more: a client of those slots would be sent away).
        counts.len() == ids.len()
            && counts.iter().all(|c| c + 2 >= fair)
            && !(counts.iter().any(|c| *c > ceil) && counts.iter().any(|c| *c < floor))
    });
}

/// The node the slot table in etcd gives the session of `client_id` to.
pub fn owner_of(etcd: &Etcd, prefix: &str, client_id: &str) -> String {
    let table: Value =
        serde_json::from_str(&etcd.get(&format!("{prefix}/slots")).unwrap()).unwrap();
    let slot = shardmq::cluster::slot_of(client_id.as_bytes()) as u64;
    table["ranges"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["first"].as_u64().unwrap() <= slot && slot <= r["last"].as_u64().unwrap())
        .map(|r| r["node"].as_str().unwrap().to_string())
        .unwrap()
}

/// A client id starting with `stem` whose session the slot table in etcd gives to `node`.
pub fn id_owned_by(etcd: &Etcd, prefix: &str, node: &str, stem: &str) -> String {
    let table: Value =
        serde_json::from_str(&etcd.get(&format!("{prefix}/slots")).unwrap()).unwrap();
    (0..100_000)
        .map(|i| format!("{stem}-{i}"))
        .find(|id| {
            let slot = shardmq::cluster::slot_of(id.as_bytes()) as u64;
            table["ranges"].as_array().unwrap().iter().any(|r| {
                r["node"] == node
                    && r["first"].as_u64().unwrap() <= slot
                    && slot <= r["last"].as_u64().unwrap()
            })
        })
        .unwrap_or_else(|| panic!("no id owned by {node}"))
}

/// Waits until every node sees every other up with a live link.
pub fn wait_linked(nodes: &[&TestBroker]) {
    let ids: Vec<String> = nodes
        .iter()
        .map(|n| {
            n.admin_json("/api/cluster")["node"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    for (node, me) in nodes.iter().zip(&ids) {
        wait_until("every member up with a live link", TIMEOUT, || {
            ids.iter()
                .all(|m| member_state(node, m) == "up" && (m == me || link_state(node, m) == "up"))
        });
    }
}
