//! What the admin API asks a shard about its own state: counters summed over its sessions,
//! pages of sessions, subscriptions and retained messages, one session, and discarding one.
//! Answered on the shard's thread (a map-reduce task), so nothing here locks.
//!
//! Pages are ordered by a key (client id; filter then client id; topic) and continue after
//! the last key of the previous page, so that a page costs one pass over the shard's map
//! and a heap of `limit` entries, whatever the position.

use std::cell::RefCell;
use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::time::Instant;

use serde::Serialize;

use super::Core;
use crate::protocol::{MqttStr, ProtocolVersion, ReasonCode};
use crate::session::state::SessionStats;
use crate::session::{owner_shard, Message, Session, SharedMessage};

/// The most entries one page holds.
pub const PAGE_ITEMS_MAX: usize = 1000;
/// The longest search text a listing accepts, in bytes.
pub const SEARCH_BYTES_MAX: usize = 256;
/// Payload bytes shown of a retained message.
const PAYLOAD_PREVIEW_BYTES: usize = 64;

/// Part of a listing: the entries after the cursor, and how many there are in all.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Page<T> {
    pub total: usize,
    /// Entries past the cursor, those in `items` included.
    pub remaining: usize,
    pub items: Vec<T>,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct SubscriptionBrief {
    pub filter: String,
    pub qos: u8,
}

/// One session, as the admin API shows it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct SessionInfo {
    pub client_id: String,
    pub shard: usize,
    pub online: bool,
    /// "3.1", "3.1.1" or "5.0": of the last connection.
    pub protocol: &'static str,
    /// Whether its state is kept on disk (it outlives the connection).
    pub persistent: bool,
    /// Session Expiry Interval, seconds; `None`: never expires.
    pub expiry_s: Option<u32>,
    pub subscriptions: Vec<SubscriptionBrief>,
    pub queued_messages: u64,
    pub queued_bytes: u64,
    pub inflight: usize,
    pub delivered: u64,
    /// Every message the session dropped or refused, counted since it was made (kept
    /// with the session on disk, so restarts do not reset it).
    pub dropped: u64,
    /// Of those: refused or pushed out by its own queue limits (`limits.queue_*`).
    pub dropped_queue_full: u64,
    /// Of those: refused while the broker-wide `storage.queued_bytes_max` was spent.
    pub dropped_storage_budget: u64,
    /// Whether its queue is full now (refusing, or pushing out its oldest).
    pub queue_full: bool,
    /// The client's address, while it is online.
    pub address: Option<String>,
    /// The user name its client logged in with (for a session read back from disk whose
    /// client has not returned: the user that made it, when recorded); `None`: anonymous
    /// or not known.
    pub user: Option<String>,
    /// Keep alive the broker enforces on the connection, seconds (0: none); while online.
    pub keep_alive_s: Option<u16>,
    /// When its client connected (unix ms), while online.
    pub connected_since_unix_ms: Option<u64>,
    /// When its client went away (unix ms), while offline and when known.
    pub offline_since_unix_ms: Option<u64>,
    /// When it expires (unix ms), while offline with a finite expiry.
    pub expires_at_unix_ms: Option<u64>,
}

/// Which sessions a listing shows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionFilter {
    /// Only those whose client id, user or address contains this (ASCII case ignored).
    pub search: Option<String>,
    /// Only those online (`Some(true)`) or offline (`Some(false)`).
    pub online: Option<bool>,
}

impl SessionFilter {
    fn admits(&self, s: &Session, search: Option<&Search>) -> bool {
        if self.online.is_some_and(|o| o != s.is_online()) {
            return false;
        }
        let Some(q) = search else {
            return true;
        };
        q.matches(s.client_id.as_str())
            || user_of(s).is_some_and(|u| q.matches(u))
            || s.link
                .as_ref()
                .and_then(|l| l.peer)
                .is_some_and(|a| q.matches(&a.to_string()))
    }
}

/// A substring search with ASCII case ignored, in time linear in the text searched (a
/// listing may search a million topics of 4 KiB on the shard's thread: no quadratic
/// worst case).
pub(crate) struct Search {
    finder: memchr::memmem::Finder<'static>,
    /// The text being searched, lower-cased (reused between calls).
    lowered: RefCell<Vec<u8>>,
}

impl Search {
    /// `None` for no search (an empty text matches everything).
    pub(crate) fn new(q: Option<&str>) -> Option<Search> {
        let q = q.filter(|q| !q.is_empty())?;
        let needle = q.to_ascii_lowercase();
        Some(Search {
            finder: memchr::memmem::Finder::new(needle.as_bytes()).into_owned(),
            lowered: RefCell::default(),
        })
    }

    pub(crate) fn matches(&self, text: &str) -> bool {
        let mut b = self.lowered.borrow_mut();
        b.clear();
        b.extend(text.bytes().map(|c| c.to_ascii_lowercase()));
        self.finder.find(&b).is_some()
    }
}

/// Whether `text` contains `q`, ASCII case ignored.
#[cfg(test)]
fn contains(text: &str, q: &str) -> bool {
    Search::new(Some(q)).is_none_or(|s| s.matches(text))
}

/// The user name a session is known by (see [`SessionInfo::user`]).
fn user_of(s: &Session) -> Option<&str> {
    s.identity
        .as_ref()
        .or(s.owner.as_ref())
        .and_then(|u| u.as_ref())
        .map(|u| u.as_str())
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct SubscriptionInfo {
    pub filter: String,
    pub client_id: String,
    pub shard: usize,
    pub qos: u8,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct RetainedInfo {
    pub topic: String,
    pub qos: u8,
    pub payload_bytes: usize,
    /// The start of the payload, as text (invalid UTF-8 replaced).
    pub payload_preview: String,
}

pub(super) fn protocol_name(v: ProtocolVersion) -> &'static str {
    match v {
        ProtocolVersion::V3_1 => "3.1",
        ProtocolVersion::V3_1_1 => "3.1.1",
        ProtocolVersion::V5 => "5.0",
    }
}

/// The `limit` smallest keys past the cursor (`past`), in order; how many keys there are in
/// all, and past the cursor.
fn smallest_after<K: Ord>(
    keys: impl Iterator<Item = K>,
    past: impl Fn(&K) -> bool,
    limit: usize,
) -> (usize, usize, Vec<K>) {
    let (mut total, mut remaining) = (0, 0);
    let mut heap = BinaryHeap::with_capacity(limit + 1);
    for k in keys {
        total += 1;
        if !past(&k) {
            continue;
        }
        remaining += 1;
        if limit == 0 {
            continue;
        }
        if heap.len() < limit {
            heap.push(k);
        } else if heap.peek().is_some_and(|top| k < *top) {
            heap.pop();
            heap.push(k);
        }
    }
    (total, remaining, heap.into_sorted_vec())
}

/// A retained message ordered by its topic.
struct ByTopic(SharedMessage);

impl PartialEq for ByTopic {
    fn eq(&self, o: &Self) -> bool {
        self.0.topic.as_str() == o.0.topic.as_str()
    }
}
impl Eq for ByTopic {}
impl PartialOrd for ByTopic {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for ByTopic {
    fn cmp(&self, o: &Self) -> Ordering {
        self.0.topic.as_str().cmp(o.0.topic.as_str())
    }
}

impl Core {
    /// What the shard's sessions counted: those that ended, plus the live ones.
    /// Counters of this run: the drops that sessions read back from disk had counted
    /// before it are not part of them.
    pub fn delivery_totals(&self) -> SessionStats {
        let mut t = self.stats.ended_sessions;
        for s in self.sessions.values() {
            t.add(&s.stats);
        }
        t.sub(&self.stats.restored_drops);
        t
    }

    /// Messages and payload bytes queued for the shard's sessions.
    pub fn queue_depth(&self) -> (u64, u64) {
        self.sessions.values().fold((0, 0), |(m, b), s| {
            (m + s.queued_messages(), b + s.queued_bytes())
        })
    }

    /// Bytes the shard's store takes on disk (0 without a store).
    pub fn storage_bytes(&self) -> u64 {
        self.store.as_ref().map_or(0, |s| s.disk_bytes())
    }

    /// Subscriptions held by the shard's sessions.
    pub fn subscription_count(&self) -> usize {
        self.sessions.values().map(|s| s.subscriptions.len()).sum()
    }

    fn session_info(&self, s: &Session) -> SessionInfo {
        let mut subscriptions: Vec<SubscriptionBrief> = s
            .subscriptions
            .values()
            .map(|sub| SubscriptionBrief {
                filter: sub.filter.as_str().to_string(),
                qos: sub.options.qos as u8,
            })
            .collect();
        subscriptions.sort_by(|a, b| a.filter.cmp(&b.filter));
        let st = &s.stats;
        let link = s.link.as_ref();
        let since = s.since.map(|t| self.wall.unix_ms_of(t));
        let offline_since = if link.is_none() { since } else { None };
        SessionInfo {
            client_id: s.client_id.as_str().to_string(),
            shard: self.id,
            online: s.is_online(),
            protocol: protocol_name(s.version),
            persistent: s.persistent,
            expiry_s: (s.expiry_s != u32::MAX).then_some(s.expiry_s),
            subscriptions,
            queued_messages: s.queued_messages(),
            queued_bytes: s.queued_bytes(),
            inflight: s.inflight().count(),
            delivered: st.delivered,
            dropped: st.dropped_total(),
            dropped_queue_full: st.dropped_queue_full,
            dropped_storage_budget: st.dropped_storage_budget,
            queue_full: s.queue_is_full(),
            address: link.and_then(|l| l.peer).map(|a| a.to_string()),
            user: user_of(s).map(str::to_owned),
            keep_alive_s: link.map(|l| l.keep_alive_s),
            connected_since_unix_ms: if link.is_some() { since } else { None },
            offline_since_unix_ms: offline_since,
            expires_at_unix_ms: offline_since
                .filter(|_| s.expiry_s != u32::MAX)
                .map(|t| t.saturating_add(u64::from(s.expiry_s) * 1000)),
        }
    }

    /// One session of this shard.
    pub fn inspect_session(&self, client_id: &str) -> Option<SessionInfo> {
        let id = MqttStr::new(client_id).ok()?;
        self.sessions.get(&id).map(|s| self.session_info(s))
    }

    /// The shard's sessions that `filter` admits, after client id `after`, by client id.
    pub fn sessions_page(
        &self,
        after: Option<&str>,
        limit: usize,
        filter: &SessionFilter,
    ) -> Page<SessionInfo> {
        let search = Search::new(filter.search.as_deref());
        let (total, remaining, keys) = smallest_after(
            self.sessions
                .iter()
                .filter(|(_, s)| filter.admits(s, search.as_ref()))
                .map(|(k, _)| k.as_str()),
            |k| after.is_none_or(|a| *k > a),
            limit.min(PAGE_ITEMS_MAX),
        );
        let items = keys
            .into_iter()
            .filter_map(|k| self.inspect_session(k))
            .collect();
        Page {
            total,
            remaining,
            items,
        }
    }

    /// The shard's subscriptions after `(filter, client id)`, in that order; with `search`,
    /// those whose filter or client id contains it.
    pub fn subscriptions_page(
        &self,
        after: Option<(&str, &str)>,
        limit: usize,
        search: Option<&str>,
    ) -> Page<SubscriptionInfo> {
        let search = Search::new(search);
        let all = self
            .sessions
            .values()
            .flat_map(|s| {
                s.subscriptions
                    .values()
                    .map(move |sub| (sub.filter.as_str(), s.client_id.as_str(), sub.options.qos))
            })
            .filter(|&(f, c, _)| search.as_ref().is_none_or(|q| q.matches(f) || q.matches(c)));
        // The QoS rides along; the key is (filter, client id), unique per session.
        let (total, remaining, keys) = smallest_after(
            all,
            |&(f, c, _)| after.is_none_or(|a| (f, c) > a),
            limit.min(PAGE_ITEMS_MAX),
        );
        let items = keys
            .into_iter()
            .map(|(filter, client_id, qos)| SubscriptionInfo {
                filter: filter.to_string(),
                client_id: client_id.to_string(),
                shard: self.id,
                qos: qos as u8,
            })
            .collect();
        Page {
            total,
            remaining,
            items,
        }
    }

    /// The retained messages whose topics this shard owns (every shard holds a copy of
    /// all of them; each lists its own share), after topic `after`; with `search`, those
    /// whose topic contains it; `$SYS/...` topics only with `sys`.
    pub fn retained_page(
        &self,
        after: Option<&str>,
        limit: usize,
        search: Option<&str>,
        sys: bool,
    ) -> Page<RetainedInfo> {
        let search = Search::new(search);
        let mut mine = Vec::new();
        self.retained.for_each_any(|m| {
            let t = m.topic.as_str();
            if owner_shard(m.topic.as_bytes(), self.count) == self.id
                && (sys || !t.starts_with("$SYS/"))
                && search.as_ref().is_none_or(|q| q.matches(t))
            {
                mine.push(ByTopic(m.clone()));
            }
        });
        let (total, remaining, keys) = smallest_after(
            mine.into_iter(),
            |m| after.is_none_or(|a| m.0.topic.as_str() > a),
            limit.min(PAGE_ITEMS_MAX),
        );
        let items = keys
            .into_iter()
            .map(|ByTopic(m)| {
                let n = m.payload.len().min(PAYLOAD_PREVIEW_BYTES);
                RetainedInfo {
                    topic: m.topic.as_str().to_string(),
                    qos: m.qos as u8,
                    payload_bytes: m.payload.len(),
                    payload_preview: String::from_utf8_lossy(&m.payload[..n]).into_owned(),
                }
            })
            .collect();
        Page {
            total,
            remaining,
            items,
        }
    }

    /// Discards a session of this shard: its connection (if any) is closed with DISCONNECT
    /// 0x98 (Administrative action) for MQTT 5 clients, and its state, stored state
    /// included, is deleted. A pending will is published, as when a session ends.
    pub fn delete_session(&mut self, client_id: &str, now: Instant) -> bool {
        let Ok(id) = MqttStr::new(client_id) else {
            return false;
        };
        let Some(s) = self.sessions.get_mut(&id) else {
            return false;
        };
        if let Some(link) = s.detach(now) {
            link.out.close(Some(ReasonCode::AdministrativeAction));
            self.stats.connection_ended();
        }
        self.stats.sessions_deleted += 1;
        self.end_session(&id, now);
        true
    }

    /// Disconnects a session's client, as an operator's action: DISCONNECT 0x98
    /// (Administrative action) for an MQTT 5 client, its will published as for a lost
    /// connection; the session stays or ends as its expiry says. `false`: no such session
    /// online here.
    pub fn kick_session(&mut self, client_id: &str, now: Instant) -> bool {
        let Ok(id) = MqttStr::new(client_id) else {
            return false;
        };
        let Some(ctx) = self.sessions.get(&id).and_then(|s| {
            s.link
                .as_ref()
                .map(|l| (l.conn_id, l.out.clone(), s.version, l.peer))
        }) else {
            return false;
        };
        let (conn_id, out, version, peer) = ctx;
        out.close(Some(ReasonCode::AdministrativeAction));
        self.stats.sessions_kicked += 1;
        let ctx = super::ConnCtx::closing(conn_id, id, version, out, peer);
        self.disconnected(&ctx, super::Ending::Lost, now);
        true
    }

    /// Publishes a broker message (`$SYS/...`): retained, QoS 0, through normal routing.
    pub fn publish_sys(&mut self, topic: &str, payload: String, now: Instant) {
        let Ok(topic) = crate::protocol::TopicName::new(topic) else {
            return;
        };
        let msg = Message::by_broker_retained(topic, payload.into(), now);
        self.route(std::sync::Arc::new(msg), now, None);
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests_support::{conn, connect_v5, core, drain, subscribe_packet};
    use super::*;
    use crate::protocol::{Packet, PacketId, Publish, QoS, TopicName};
    use crate::session::outbound::Outbound;
    use std::rc::Rc;

    fn publish(topic: &str, pid: u16) -> Packet {
        Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: TopicName::new(topic).unwrap(),
            packet_id: PacketId::new(pid),
            properties: Default::default(),
            payload: bytes::Bytes::from_static(b"x"),
        })
    }

    #[test]
    fn sys_publishes_are_dropped_counters_move_and_a_deleted_session_is_gone() {
        let now = Instant::now();
        let mut c = core();
        let (mut a, a_out) = conn(&mut c, "a", now);
        let (mut b, b_out) = conn(&mut c, "b", now);
        c.on_packet(&mut a, subscribe_packet(1, "$SYS/#", QoS::AtLeastOnce), now)
            .unwrap();
        c.on_packet(&mut a, subscribe_packet(2, "s/#", QoS::AtLeastOnce), now)
            .unwrap();
        drain(&a_out);
        drain(&b_out);

        c.on_packet(&mut b, publish("$SYS/broker/forged", 1), now)
            .unwrap();
        assert!(matches!(&drain(&b_out)[..],
            [Packet::PubAck(ack)] if ack.reason_code == ReasonCode::NotAuthorized));
        assert!(a_out.is_empty());
        assert_eq!(c.stats.sys_publish_dropped, 1);

        c.on_packet(&mut b, publish("s/1", 2), now).unwrap();
        assert!(matches!(&drain(&a_out)[..], [Packet::Publish(_)]));
        assert_eq!(c.stats.received_qos, [0, 2, 0]);
        assert_eq!(c.delivery_totals().delivered_qos, [0, 1, 0]);
        assert_eq!(c.subscription_count(), 2);
        let info = c.inspect_session("a").unwrap();
        assert!(info.online);
        assert_eq!(info.protocol, "5.0");
        assert_eq!(info.inflight, 1);

        // The broker's own $SYS message reaches the $SYS subscriber.
        c.publish_sys("$SYS/broker/uptime", "3 seconds".into(), now);
        assert!(matches!(&drain(&a_out)[..],
            [Packet::Publish(p)] if p.topic.as_str() == "$SYS/broker/uptime"));
        assert_eq!(
            c.retained_page(None, 10, None, true).items[0].payload_preview,
            "3 seconds"
        );

        assert!(c.delete_session("a", now));
        assert!(matches!(drain(&a_out).last(),
            Some(Packet::Disconnect(d)) if d.reason_code == ReasonCode::AdministrativeAction));
        assert_eq!(c.inspect_session("a"), None);
        assert!(!c.delete_session("a", now));
        assert_eq!(c.stats.connections, 1);
        assert_eq!(c.stats.sessions_deleted, 1);
        // What the deleted session counted stays in the shard's totals.
        assert_eq!(c.delivery_totals().delivered_qos, [1, 1, 0]);
        assert_eq!(
            c.sessions_page(None, 10, &SessionFilter::default()).total,
            1
        );
    }

    /// A v5 client with a session that outlives its connection, logged in as `user`
    /// from `peer`, keep alive 30 s.
    fn login(c: &mut Core, id: &str, user: &str, peer: &str, now: Instant) -> Rc<Outbound> {
        let out = Rc::new(Outbound::new(ProtocolVersion::V5));
        let connect = crate::protocol::Connect {
            keep_alive: 30,
            ..connect_v5(id, true, Some(600))
        };
        let login = super::super::Login {
            username: Some(MqttStr::new(user).unwrap()),
            refused: None,
            peer: Some(peer.parse().unwrap()),
        };
        c.connect_as(&connect, None, login, out.clone(), now)
            .unwrap();
        out
    }

    #[test]
    fn sessions_show_who_and_when_and_are_found_by_search_and_state() {
        let now = Instant::now();
        let mut c = core();
        let a_out = login(&mut c, "sensor-1", "alice", "192.0.2.7:4000", now);
        let _b_out = login(&mut c, "Sensor-2", "bob", "[2001:db8::2]:5000", now);
        let _c = conn(&mut c, "other", now);
        let a = c.inspect_session("sensor-1").unwrap();
        assert_eq!(a.address.as_deref(), Some("192.0.2.7:4000"));
        assert_eq!(a.user.as_deref(), Some("alice"));
        assert_eq!(a.keep_alive_s, Some(30));
        assert!(a.connected_since_unix_ms.is_some());
        assert_eq!(
            (a.offline_since_unix_ms, a.expires_at_unix_ms),
            (None, None)
        );

        let ids = |c: &Core, search: Option<&str>, online: Option<bool>| {
            let f = SessionFilter {
                search: search.map(str::to_owned),
                online,
            };
            let p = c.sessions_page(None, 10, &f);
            let ids: Vec<String> = p.items.into_iter().map(|s| s.client_id).collect();
            (p.total, ids)
        };
        assert_eq!(ids(&c, Some("SENSOR"), None).1, ["Sensor-2", "sensor-1"]);
        assert_eq!(ids(&c, Some("bob"), None).1, ["Sensor-2"]);
        assert_eq!(ids(&c, Some("2001:db8"), None).1, ["Sensor-2"]);
        assert_eq!(ids(&c, Some("nobody"), None), (0, vec![]));

        // Kicked: DISCONNECT 0x98, the session stays, offline, with its expiry.
        assert!(c.kick_session("sensor-1", now));
        assert!(matches!(drain(&a_out).last(),
            Some(Packet::Disconnect(d)) if d.reason_code == ReasonCode::AdministrativeAction));
        assert!(!c.kick_session("sensor-1", now), "no longer online");
        assert!(!c.kick_session("nobody", now));
        assert_eq!(c.stats.sessions_kicked, 1);
        assert_eq!(c.stats.connections, 2);
        let a = c.inspect_session("sensor-1").unwrap();
        assert!(!a.online);
        assert_eq!((a.address, a.keep_alive_s), (None, None));
        assert_eq!(a.user.as_deref(), Some("alice"));
        let gone = a.offline_since_unix_ms.unwrap();
        assert_eq!(a.expires_at_unix_ms, Some(gone + 600_000));
        assert_eq!(ids(&c, None, Some(false)).1, ["sensor-1"]);
        assert_eq!(ids(&c, None, Some(true)).1, ["Sensor-2", "other"]);
    }

    #[test]
    fn subscriptions_and_retained_are_found_by_search() {
        let now = Instant::now();
        let mut c = core();
        let (mut a, _a_out) = conn(&mut c, "a", now);
        for (i, f) in ["home/kitchen/temp", "home/hall/+", "office/#"]
            .iter()
            .enumerate()
        {
            c.on_packet(
                &mut a,
                subscribe_packet(i as u16 + 1, f, QoS::AtMostOnce),
                now,
            )
            .unwrap();
        }
        let filters = |search| -> Vec<String> {
            c.subscriptions_page(None, 10, search)
                .items
                .into_iter()
                .map(|s| s.filter)
                .collect()
        };
        assert_eq!(filters(Some("HOME")), ["home/hall/+", "home/kitchen/temp"]);
        assert_eq!(filters(Some("a")).len(), 3, "the client id matches too");
        let mut p = publish("home/kitchen/temp", 9);
        if let Packet::Publish(p) = &mut p {
            p.retain = true;
        }
        c.on_packet(&mut a, p, now).unwrap();
        c.publish_sys("$SYS/broker/uptime", "1".into(), now);
        let topics = |search, sys| -> Vec<String> {
            c.retained_page(None, 10, search, sys)
                .items
                .into_iter()
                .map(|r| r.topic)
                .collect()
        };
        assert_eq!(
            topics(None, true),
            ["$SYS/broker/uptime", "home/kitchen/temp"]
        );
        assert_eq!(topics(None, false), ["home/kitchen/temp"]);
        assert_eq!(topics(Some("KITCHEN"), true), ["home/kitchen/temp"]);
        assert!(topics(Some("nothing"), true).is_empty());
    }

    #[test]
    fn search_ignores_ascii_case_only() {
        assert!(contains("Sensor-1", "sENSOR"));
        assert!(contains("x", ""));
        assert!(!contains("ab", "abc"));
        assert!(!contains("grüße", "GRÜ"));
        assert!(contains("grüße", "grü"));
    }

    #[test]
    fn pages_continue_after_the_cursor_in_key_order() {
        let keys = ["d", "a", "c", "e", "b"];
        let page = |after: Option<&str>, limit| {
            smallest_after(
                keys.iter().copied(),
                |k| after.is_none_or(|a| *k > a),
                limit,
            )
        };
        assert_eq!(page(None, 2), (5, 5, vec!["a", "b"]));
        assert_eq!(page(Some("b"), 2), (5, 3, vec!["c", "d"]));
        assert_eq!(page(Some("d"), 10), (5, 1, vec!["e"]));
        assert_eq!(page(None, 0), (5, 5, vec![]));
    }
}
