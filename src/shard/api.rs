//! What the rest of the broker may ask of a shard: the network layer's calls for one
//! connection (login, CONNECT, packets, the end), and the admin endpoint's and `$SYS`
//! publisher's questions to every shard ([`Query`], answered with an [`Answer`]). Nothing
//! outside `shard` borrows the core itself.

use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

pub use super::core::cluster::{
    Append, AppendFailed, ClusterLink, FromCluster, LeaseClock, NodeIx, Placement, ReplicaLink,
    Reply, SlotBits, SlotMap, ToCluster, NODES_MAX, REBUILD_NODE, ROUTES_PER_NODE_MAX, SLOT_HERE,
    SLOT_NOWHERE,
};
pub use super::core::inspect::SEARCH_BYTES_MAX;
pub use super::core::{
    Accepted, ConnCtx, CoreStats, Ending, Flow, Login, LoginStep, Page, RetainedInfo,
    SessionFilter, SessionInfo, SubscriptionInfo, PAGE_ITEMS_MAX,
};
pub use super::history::{RatePoint, RATE_STEP_MS};
use super::service::BrokerShard;
use crate::auth::Auth;
use crate::config::Config;
use crate::protocol::{Connect, MqttStr, Packet, ReasonCode};
use crate::session::outbound::Outbound;
use crate::session::state::SessionStats;

/// A question for every shard (map-reduce), asked by the admin API and the `$SYS`
/// publisher. Listings take a cursor (the last key of the previous page) and a limit.
#[derive(Clone, Debug)]
pub enum Query {
    Stats,
    /// Put these password and ACL rules in force (reload); answered with the stats.
    SetAuth(Arc<Auth>),
    Sessions {
        after: Option<String>,
        limit: usize,
        filter: SessionFilter,
    },
    /// One session, by client id (only its owner answers `Some`).
    Session(String),
    /// Disconnects a session if online and discards it, stored state included.
    DeleteSession(String),
    /// Disconnects a session's client (DISCONNECT 0x98 for MQTT 5); the session stays
    /// as its expiry has it.
    Kick(String),
    /// The shard's counters, sampled over the last minutes.
    Rates,
    /// By (filter, client id).
    Subscriptions {
        after: Option<(String, String)>,
        limit: usize,
        /// Only those whose filter or client id contains this.
        search: Option<String>,
    },
    /// Work from the cluster thread (posted, never answered: see `Control::post`).
    Cluster(Vec<FromCluster>),
    /// The slots this shard holds sessions in (answered with `Answer::Slots`).
    SlotsInUse,
    /// Whether this shard has the cluster's slot table (`Answer::Ready`).
    SlotMapReady,
    /// The stored sessions of these slots (moving to another node), as records
    /// (`Answer::Moving`).
    MovingSessions(Arc<SlotBits>),
    /// By topic; each shard lists the topics it owns.
    Retained {
        after: Option<String>,
        limit: usize,
        /// Only topics containing this.
        search: Option<String>,
        /// Whether the broker's own `$SYS/...` topics are listed.
        sys: bool,
    },
}

/// One shard's answer to a [`Query`] (the variant of the question).
#[derive(Debug)]
pub enum Answer {
    Stats(Box<ShardStats>),
    Sessions(Page<SessionInfo>),
    Session(Option<SessionInfo>),
    Deleted(bool),
    Kicked(bool),
    Rates(Vec<RatePoint>),
    Subscriptions(Page<SubscriptionInfo>),
    Retained(Page<RetainedInfo>),
    /// A posted query was handled.
    Done,
    Slots(Box<SlotBits>),
    Ready(bool),
    Moving(Result<Box<MovedSessions>, String>),
}

/// Sessions on their way to another node: (client id, its stored records).
pub type MovedSessions = Vec<(String, Vec<crate::storage::ClientEntry>)>;

/// One shard's counters and gauges.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ShardStats {
    pub sessions: usize,
    /// Retained messages held by this shard: each shard holds a copy of all of them.
    pub retained: usize,
    pub subscriptions: usize,
    pub handoffs: u64,
    /// Sockets open (MQTT sessions online are `core.connections`).
    pub sockets: u32,
    pub queued_messages: u64,
    pub queued_bytes: u64,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub storage_bytes: u64,
    /// Will and expiry timer entries held.
    pub timers: usize,
    /// Bytes held in incomplete packets now.
    pub incomplete_packet_bytes: u64,
    /// Connections closed as the largest holders of incomplete packets over the budget.
    pub closed_incomplete_budget: u64,
    /// Connections closed because a started packet did not complete in time.
    pub closed_packet_timeout: u64,
    /// PUBLISH packets received and sent per second, since the previous stats query (at
    /// least a second before).
    pub received_per_s: f64,
    pub sent_per_s: f64,
    pub delivery: SessionStats,
    pub core: CoreStats,
}

impl BrokerShard {
    /// The configuration the shard runs with.
    pub fn config(&self) -> Rc<Config> {
        self.core.borrow().config_rc()
    }

    /// A client id for a client that sent none.
    pub fn assign_client_id(&self, seed: u64) -> MqttStr {
        self.core.borrow_mut().assign_client_id(seed)
    }

    /// Where a CONNECT's credentials stand (see [`super::core::Core::check_login`]).
    pub fn check_login(
        &self,
        connect: &Connect,
        cert_identity: Option<&str>,
        peer: Option<std::net::SocketAddr>,
    ) -> LoginStep {
        self.core
            .borrow_mut()
            .check_login(connect, cert_identity, peer)
    }

    /// Takes a CONNECT whose login was checked (see [`super::core::Core::connect_as`]).
    pub fn connect(
        &self,
        connect: &Connect,
        assigned: Option<MqttStr>,
        login: Login,
        out: Rc<Outbound>,
    ) -> Result<Accepted, ReasonCode> {
        self.core
            .borrow_mut()
            .connect_as(connect, assigned, login, out, Instant::now())
    }

    /// One packet of a connection.
    pub fn on_packet(
        &self,
        ctx: &mut ConnCtx,
        packet: Packet,
        now: Instant,
    ) -> Result<Flow, ReasonCode> {
        self.core.borrow_mut().on_packet(ctx, packet, now)
    }

    /// A connection's writer made room where a session had found it full.
    pub fn on_writable(&self, client_id: &MqttStr, conn_id: u64) {
        self.core
            .borrow_mut()
            .on_writable(client_id, conn_id, Instant::now())
    }

    /// A connection ended.
    pub fn disconnected(&self, ctx: &ConnCtx, ending: Ending) {
        self.core
            .borrow_mut()
            .disconnected(ctx, ending, Instant::now())
    }

    /// Closes every connection of the shard (the broker is stopping).
    pub fn close_all(&self) {
        self.core.borrow_mut().close_all()
    }
}
