//! shardmq: a thread-per-core MQTT 3.1 / 3.1.1 / 5.0 broker with durable persistent sessions.
//!
//! The map, from the bottom up (imports point one way, downwards):
//! - [`protocol`]: the codec (crate `shardmq-protocol`). Pure: bytes in, packets out.
//! - [`session`]: session and routing logic (crate `shardmq-session`: ownership hash, topic
//!   trie, retained store, session state). No I/O; it can import the codec only.
//! - [`auth`]: password file, ACL file and login decisions (no I/O after loading).
//! - [`config`]: every limit with its default; TOML and validation.
//! - [`admin`]: the admin HTTP endpoint (JSON API, Prometheus metrics, dashboard), on its own
//!   thread, asking the shards through map-reduce.
pub mod admin;
pub mod auth;
pub mod broker;
pub mod cluster;
pub mod config;
pub mod mosquitto;
/// The codec, a crate of its own (`crates/protocol`): it cannot import the broker.
pub use shardmq_protocol as protocol;
/// Session logic, a crate of its own (`crates/session`): it can import the codec only.
pub use shardmq_session as session;
pub mod net;
pub mod shard;
pub mod storage;
