//! shardmq: a thread-per-core MQTT 3.1 / 3.1.1 / 5.0 broker with durable persistent sessions.
//!
//! The map, from the bottom up (imports point one way, downwards):
//! - [`protocol`]: the codec. Pure: bytes in, packets out; no I/O.
//! - [`session`]: session and routing logic (ownership hash, topic trie, retained store,
//!   session state). No I/O.
//! - [`auth`]: password file, ACL file and login decisions (no I/O after loading).
//! - [`config`]: every limit with its default; TOML and validation.
//! - [`admin`]: the admin HTTP endpoint (JSON API, Prometheus metrics, dashboard), on its own
//!   thread, asking the shards through map-reduce.
pub mod admin;
pub mod auth;
pub mod broker;
pub mod config;
pub mod mosquitto;
pub mod net;
pub mod protocol;
pub mod session;
pub mod shard;
pub mod storage;
