//! The shard service: what each shard runs on the `shards` runtime. [`core::Core`] holds the
//! MQTT state of the shard; [`event::Event`]s are what shards tell each other.

pub mod api;
pub mod budget;
pub mod core;
pub mod event;
pub mod history;
pub mod incomplete;
pub mod metrics;
pub mod service;
pub mod shardset;
pub mod sys;
