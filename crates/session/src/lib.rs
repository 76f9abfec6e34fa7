//! Session and routing logic, with no I/O: who owns a client, which filters match a topic,
//! the retained messages, and the state of each session (subscriptions, in-flight windows,
//! offline queue, will). The shard service drives it and performs what it decides.

pub mod message;
pub mod ownership;
pub mod retained;
pub mod trie;

pub use message::{GroupPick, Message, Qos2Id, SharedMessage};
pub use ownership::{owner_shard, stable_hash};
pub mod outbound;
pub mod state;
pub mod subscriptions;

pub use outbound::Outbound;
pub use state::{Delivery, Link, Session, SessionLimits, Subscription, Will};
