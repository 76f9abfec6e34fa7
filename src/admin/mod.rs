//! The admin endpoint: a JSON API (`/api/...`), Prometheus metrics (`/metrics`) and a
//! dashboard (`/`), served by axum on a tokio current-thread runtime on a thread of its own.
//!
//! It never touches shard state directly: every request asks the shards through
//! [`Control::map_reduce`] (each shard answers in a task of its own, between its other
//! work), run on tokio's blocking pool so that the HTTP thread keeps serving. At most
//! `admin.concurrent_requests_max` such gatherings run at once.
//!
//! Endpoints (listings are paged: `?after=<last key of the previous page>&limit=N`, `limit`
//! at most [`PAGE_ITEMS_MAX`], default [`PAGE_ITEMS_DEFAULT`]; the answer carries `next`,
//! the cursor of the following page, while there is one):
//! - `GET /api/shards`: per shard, its core, connections, sessions, queue depth, message
//!   rates, bytes on disk;
//! - `GET /api/sessions` (`q`: client id, user or address contains; `state`: `online` or
//!   `offline`), `GET /api/sessions/{client_id}` (404 if none),
//!   `DELETE /api/sessions/{client_id}` (disconnects and discards it; 204, or 404),
//!   `POST /api/sessions/{client_id}/disconnect` (disconnects its client, DISCONNECT 0x98
//!   for MQTT 5; the session stays as its expiry says; 204, or 404 when not online);
//! - `GET /api/subscriptions` (cursor `after_filter` + `after_client`; `q`: filter or client
//!   id contains), `GET /api/retained` (`q`: topic contains; `sys=false` leaves out
//!   `$SYS/...`);
//! - `GET /api/rates`: messages and bytes per second over the last ten minutes, one point
//!   per 2 s step, summed over the shards;
//! - `GET /metrics`: Prometheus text format 0.0.4, every series labelled `shard`.
//!
//! Security model: reading needs no credentials (keep the endpoint on loopback or a trusted
//! network). A request whose Host header names anything but `localhost`, an IP address or
//! a name in `admin.allowed_hosts` is refused (403): a web page that rebinds its own name to
//! this address gets nothing through the browser of the operator, and a page on another
//! origin can neither read answers (no CORS headers) nor send `DELETE` (not a simple
//! request). Changing requests need `Authorization: Bearer <admin.token>`; without a
//! configured token they are off.

mod metrics;

use std::future::IntoFuture;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use axum::extract::{Path, Query as UrlQuery, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use shards::{Control, ShardId};

use crate::config::QueuePolicy;
use crate::shard::api::{
    Answer, Page, Query, RatePoint, RetainedInfo, SessionFilter, SessionInfo, ShardStats,
    SubscriptionInfo, PAGE_ITEMS_MAX, RATE_STEP_MS, SEARCH_BYTES_MAX,
};
use crate::shard::service::BrokerShard;

/// Entries per page when the request does not say.
pub const PAGE_ITEMS_DEFAULT: usize = 100;
/// How long a request waits for every shard to answer.
const GATHER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long requests under way may take to finish when the broker stops.
const STOP_GRACE: Duration = Duration::from_secs(2);

const DASHBOARD: &str = include_str!("dashboard.html");

/// What the admin endpoint knows about the broker besides what the shards answer.
#[derive(Clone, Debug)]
pub struct BrokerInfo {
    /// Shard index -> core it is pinned to.
    pub cores: Vec<Option<usize>>,
    pub queue_policy: QueuePolicy,
    pub started: SystemTime,
    pub concurrent_requests_max: u32,
    /// Host names accepted besides `localhost` and IP addresses (`admin.allowed_hosts`).
    pub allowed_hosts: Vec<String>,
    /// The bearer token of changing requests (`admin.token`); `None`: they are off.
    pub token: Option<String>,
    /// This node's view of its cluster, when it is a cluster node.
    pub cluster: Option<crate::cluster::ClusterHandle>,
}

/// The running admin endpoint; [`AdminServer::stop`] ends it.
#[derive(Debug)]
pub struct AdminServer {
    pub addr: SocketAddr,
    shutdown: Option<tokio::sync::watch::Sender<bool>>,
    thread: Option<JoinHandle<()>>,
}

/// Binds the admin socket (before the shards start, so that a taken port fails the start).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let l = TcpListener::bind(addr)?;
    l.set_nonblocking(true)?;
    Ok(l)
}

struct AppState {
    control: Control<BrokerShard>,
    info: BrokerInfo,
    permits: tokio::sync::Semaphore,
}

type Shared = Arc<AppState>;

impl AdminServer {
    /// Serves `listener` on a new thread until [`AdminServer::stop`].
    pub fn start(
        listener: TcpListener,
        control: Control<BrokerShard>,
        info: BrokerInfo,
    ) -> std::io::Result<AdminServer> {
        let addr = listener.local_addr()?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .max_blocking_threads(info.concurrent_requests_max as usize)
            .thread_name("shardmq-admin-query")
            .build()?;
        let (tx, rx) = tokio::sync::watch::channel(false);
        let state = Arc::new(AppState {
            control,
            permits: tokio::sync::Semaphore::new(info.concurrent_requests_max as usize),
            info,
        });
        let thread = std::thread::Builder::new()
            .name("shardmq-admin".into())
            .spawn(move || {
                rt.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!(error = %e, "admin endpoint cannot use its socket");
                            return;
                        }
                    };
                    let stopping = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
                        let _ = rx.wait_for(|stop| *stop).await;
                    };
                    let serve = axum::serve(listener, router(state))
                        .with_graceful_shutdown(stopping(rx.clone()));
                    // Requests under way get STOP_GRACE to finish; then the thread ends anyway.
                    let bound = async move {
                        stopping(rx).await;
                        tokio::time::sleep(STOP_GRACE).await;
                        Ok(())
                    };
                    if let Err(e) = futures_lite::future::or(serve.into_future(), bound).await {
                        tracing::error!(error = %e, "admin endpoint failed");
                    }
                });
            })?;
        Ok(AdminServer {
            addr,
            shutdown: Some(tx),
            thread: Some(thread),
        })
    }

    /// Stops serving and waits for the thread.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(true);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Whether a Host header value (name or address, with or without a port) may be served:
/// `localhost`, an IP address literal, or one of `allowed` (case-insensitive).
fn host_allowed(host: &str, allowed: &[String]) -> bool {
    let name = if let Some(v6) = host.strip_prefix('[') {
        return v6.split_once(']').is_some_and(|(addr, rest)| {
            addr.parse::<std::net::Ipv6Addr>().is_ok()
                && (rest.is_empty() || rest.strip_prefix(':').is_some_and(is_port))
        });
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if is_port(port) => name,
            Some(_) => return false,
            None => host,
        }
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    name.parse::<std::net::Ipv4Addr>().is_ok()
        || name.eq_ignore_ascii_case("localhost")
        || allowed.iter().any(|a| {
            let a = a.strip_suffix('.').unwrap_or(a);
            a.eq_ignore_ascii_case(name)
        })
}

fn is_port(p: &str) -> bool {
    !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit())
}

/// Refuses a request whose Host header names a host this endpoint does not answer for.
async fn host_guard(State(st): State<Shared>, req: Request, next: Next) -> Response {
    let host = req.headers().get(header::HOST).map(|h| h.to_str());
    match host {
        // Browsers always send one; a client without one cannot be a rebound page.
        None => next.run(req).await,
        Some(Ok(h)) if host_allowed(h, &st.info.allowed_hosts) => next.run(req).await,
        Some(h) => {
            let shown = h
                .unwrap_or("(not text)")
                .chars()
                .take(256)
                .collect::<String>();
            // Debug, not warn: a page in a browser can send these as fast as it likes.
            tracing::debug!(host = %shown, "admin request refused: Host not allowed (admin.allowed_hosts)");
            ApiError(
                StatusCode::FORBIDDEN,
                format!("Host {shown:?} is not served here: add it to admin.allowed_hosts"),
            )
            .into_response()
        }
    }
}

/// Checks a changing request's credentials (see the module docs).
fn authorize(st: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    use sha2::{Digest, Sha256};
    use subtle::ConstantTimeEq;
    let Some(token) = &st.info.token else {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            "changing requests are off: set admin.token".into(),
        ));
    };
    // The scheme name is case-insensitive (RFC 7235).
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim());
    // Digests of equal length, compared in constant time: neither the token's bytes nor
    // its length show in the answer's timing.
    let digest = |t: &str| Sha256::digest(t.as_bytes());
    match given {
        Some(g) if bool::from(digest(g).ct_eq(&digest(token))) => Ok(()),
        _ => Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "this request needs Authorization: Bearer <admin.token>".into(),
        )),
    }
}

fn router(state: Shared) -> Router {
    let guard = axum::middleware::from_fn_with_state(state.clone(), host_guard);
    Router::new()
        .route("/", get(dashboard))
        .route("/metrics", get(metrics_text))
        .route("/api/shards", get(shards))
        .route("/api/sessions", get(sessions))
        .route(
            "/api/sessions/{client_id}",
            get(session).delete(delete_session),
        )
        .route("/api/sessions/{client_id}/disconnect", post(kick_session))
        .route("/api/rates", get(rates))
        .route("/api/subscriptions", get(subscriptions))
        .route("/api/retained", get(retained))
        .route("/api/cluster", get(cluster))
        .route("/api/cluster/nodes/{node}/failover", post(failover))
        .layer(guard)
        .with_state(state)
}

/// A request the API could not answer.
#[derive(Debug)]
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        #[derive(Serialize)]
        struct Body {
            error: String,
        }
        let mut r = (self.0, Json(Body { error: self.1 })).into_response();
        if self.0 == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer realm=\"shardmq\""),
            );
        }
        r
    }
}

/// Asks every shard `query` (off the HTTP thread) and folds the answers.
async fn gather<R: Send + 'static>(
    st: &Shared,
    query: Query,
    init: R,
    fold: impl FnMut(R, ShardId, Answer) -> R + Send + 'static,
) -> Result<R, ApiError> {
    let unavailable = |m: String| ApiError(StatusCode::SERVICE_UNAVAILABLE, m);
    let _permit = st
        .permits
        .acquire()
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    let control = st.control.clone();
    tokio::task::spawn_blocking(move || control.map_reduce(query, GATHER_TIMEOUT, init, fold))
        .await
        .map_err(|e| unavailable(e.to_string()))?
        .map_err(|e| unavailable(format!("the shards did not answer: {e}")))
}

async fn all_stats(st: &Shared) -> Result<Vec<ShardStats>, ApiError> {
    gather(st, Query::Stats, Vec::new(), |mut v, _, a| {
        if let Answer::Stats(s) = a {
            v.push(*s);
        }
        v
    })
    .await
}

async fn dashboard() -> Html<&'static str> {
    Html(DASHBOARD)
}

async fn metrics_text(State(st): State<Shared>) -> Result<Response, ApiError> {
    let stats = all_stats(&st).await?;
    let text = metrics::render(&stats, &st.info);
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

#[derive(Serialize)]
struct ShardView {
    shard: usize,
    core: Option<usize>,
    connections: u32,
    clients_online: u64,
    sessions: usize,
    subscriptions: usize,
    retained: usize,
    queued_messages: u64,
    queued_bytes: u64,
    received_per_s: f64,
    sent_per_s: f64,
    messages_received: u64,
    messages_sent: u64,
    storage_bytes: u64,
    /// Will and session-expiry timers held (at most one of each per offline session).
    timers: usize,
    /// Read buffer bytes held by packets that have started and are not complete.
    incomplete_packet_bytes: u64,
}

#[derive(Serialize)]
struct ShardsView {
    uptime_s: u64,
    version: &'static str,
    shards: Vec<ShardView>,
}

async fn shards(State(st): State<Shared>) -> Result<Json<ShardsView>, ApiError> {
    let stats = all_stats(&st).await?;
    let shards = stats
        .iter()
        .enumerate()
        .map(|(i, s)| ShardView {
            shard: i,
            core: st.info.cores.get(i).copied().flatten(),
            connections: s.sockets,
            clients_online: s.core.connections,
            sessions: s.sessions,
            subscriptions: s.subscriptions,
            retained: s.retained,
            queued_messages: s.queued_messages,
            queued_bytes: s.queued_bytes,
            received_per_s: s.received_per_s,
            sent_per_s: s.sent_per_s,
            messages_received: s.core.messages_received,
            messages_sent: s.delivery.delivered,
            storage_bytes: s.storage_bytes,
            timers: s.timers,
            incomplete_packet_bytes: s.incomplete_packet_bytes,
        })
        .collect();
    Ok(Json(ShardsView {
        uptime_s: st.info.started.elapsed().map_or(0, |d| d.as_secs()),
        version: env!("CARGO_PKG_VERSION"),
        shards,
    }))
}

#[derive(Deserialize)]
struct SessionParams {
    after: Option<String>,
    limit: Option<usize>,
    q: Option<String>,
    state: Option<String>,
}

#[derive(Deserialize)]
struct RetainedParams {
    after: Option<String>,
    limit: Option<usize>,
    q: Option<String>,
    sys: Option<bool>,
}

/// A search text: at most [`SEARCH_BYTES_MAX`] bytes; empty means none.
fn search_of(q: Option<String>) -> Result<Option<String>, ApiError> {
    match q {
        Some(q) if q.len() > SEARCH_BYTES_MAX => Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("q: at most {SEARCH_BYTES_MAX} bytes"),
        )),
        Some(q) if q.is_empty() => Ok(None),
        q => Ok(q),
    }
}

fn limit_of(limit: Option<usize>) -> Result<usize, ApiError> {
    match limit.unwrap_or(PAGE_ITEMS_DEFAULT) {
        n @ 1..=PAGE_ITEMS_MAX => Ok(n),
        n => Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("limit {n}: must be between 1 and {PAGE_ITEMS_MAX}"),
        )),
    }
}

#[derive(Serialize)]
struct Listing<T, C> {
    total: usize,
    items: Vec<T>,
    /// The cursor of the next page, while there is one.
    next: Option<C>,
}

/// Merges the shards' pages (each in key order) into one page of `limit` entries.
fn merge<T, K: Ord>(
    pages: Vec<Page<T>>,
    limit: usize,
    key: impl Fn(&T) -> K,
) -> (usize, Vec<T>, bool) {
    let total = pages.iter().map(|p| p.total).sum();
    let remaining: usize = pages.iter().map(|p| p.remaining).sum();
    let mut items: Vec<T> = pages.into_iter().flat_map(|p| p.items).collect();
    items.sort_by_key(|t| key(t));
    items.truncate(limit);
    let more = remaining > items.len();
    (total, items, more)
}

async fn sessions(
    State(st): State<Shared>,
    UrlQuery(p): UrlQuery<SessionParams>,
) -> Result<Json<Listing<SessionInfo, String>>, ApiError> {
    let limit = limit_of(p.limit)?;
    let online = match p.state.as_deref() {
        None | Some("") | Some("all") => None,
        Some("online") => Some(true),
        Some("offline") => Some(false),
        Some(other) => {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                format!("state {other:?}: one of online, offline, all"),
            ))
        }
    };
    let query = Query::Sessions {
        after: p.after,
        limit,
        filter: SessionFilter {
            search: search_of(p.q)?,
            online,
        },
    };
    let pages = gather(&st, query, Vec::new(), |mut v, _, a| {
        if let Answer::Sessions(p) = a {
            v.push(p);
        }
        v
    })
    .await?;
    let (total, items, more) = merge(pages, limit, |s| s.client_id.clone());
    let next = more
        .then(|| items.last().map(|s| s.client_id.clone()))
        .flatten();
    Ok(Json(Listing { total, items, next }))
}

async fn session(
    State(st): State<Shared>,
    Path(client_id): Path<String>,
) -> Result<Json<SessionInfo>, ApiError> {
    let found = gather(
        &st,
        Query::Session(client_id.clone()),
        None,
        |acc, _, a| match a {
            Answer::Session(Some(s)) => Some(s),
            _ => acc,
        },
    )
    .await?;
    found
        .map(Json)
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no session {client_id:?}")))
}

async fn delete_session(
    State(st): State<Shared>,
    Path(client_id): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    authorize(&st, &headers)?;
    let deleted = gather(
        &st,
        Query::DeleteSession(client_id.clone()),
        false,
        |acc, _, a| acc | matches!(a, Answer::Deleted(true)),
    )
    .await?;
    if deleted {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no session {client_id:?}"),
        ))
    }
}

async fn kick_session(
    State(st): State<Shared>,
    Path(client_id): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    authorize(&st, &headers)?;
    let kicked = gather(&st, Query::Kick(client_id.clone()), false, |acc, _, a| {
        acc | matches!(a, Answer::Kicked(true))
    })
    .await?;
    if kicked {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no client {client_id:?} online"),
        ))
    }
}

/// Rates over one step, summed over the shards.
#[derive(Debug, Default, PartialEq, Serialize)]
struct RateView {
    /// The end of the step (unix ms).
    unix_ms: u64,
    received_per_s: f64,
    sent_per_s: f64,
    bytes_in_per_s: f64,
    bytes_out_per_s: f64,
}

#[derive(Serialize)]
struct RatesView {
    step_s: f64,
    points: Vec<RateView>,
}

/// Each shard's rates between its consecutive samples, added up by step.
fn sum_rates(shards: &[Vec<RatePoint>]) -> Vec<RateView> {
    let mut by_step = std::collections::BTreeMap::<u64, RateView>::new();
    for points in shards {
        for w in points.windows(2) {
            let (a, b) = (&w[0], &w[1]);
            let secs = (b.step - a.step) as f64 * RATE_STEP_MS as f64 / 1000.0;
            let per_s = |x: u64, y: u64| y.saturating_sub(x) as f64 / secs;
            let v = by_step.entry(b.step).or_default();
            v.unix_ms = b.step * RATE_STEP_MS;
            v.received_per_s += per_s(a.received, b.received);
            v.sent_per_s += per_s(a.sent, b.sent);
            v.bytes_in_per_s += per_s(a.bytes_in, b.bytes_in);
            v.bytes_out_per_s += per_s(a.bytes_out, b.bytes_out);
        }
    }
    by_step.into_values().collect()
}

async fn rates(State(st): State<Shared>) -> Result<Json<RatesView>, ApiError> {
    let shards = gather(&st, Query::Rates, Vec::new(), |mut v, _, a| {
        if let Answer::Rates(p) = a {
            v.push(p);
        }
        v
    })
    .await?;
    Ok(Json(RatesView {
        step_s: RATE_STEP_MS as f64 / 1000.0,
        points: sum_rates(&shards),
    }))
}

#[derive(Deserialize)]
struct SubscriptionParams {
    after_filter: Option<String>,
    after_client: Option<String>,
    limit: Option<usize>,
    q: Option<String>,
}

#[derive(Serialize)]
struct SubscriptionCursor {
    after_filter: String,
    after_client: String,
}

async fn subscriptions(
    State(st): State<Shared>,
    UrlQuery(p): UrlQuery<SubscriptionParams>,
) -> Result<Json<Listing<SubscriptionInfo, SubscriptionCursor>>, ApiError> {
    let limit = limit_of(p.limit)?;
    let after = match (p.after_filter, p.after_client) {
        (Some(f), c) => Some((f, c.unwrap_or_default())),
        (None, None) => None,
        (None, Some(_)) => {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                "after_client needs after_filter".into(),
            ))
        }
    };
    let pages = gather(
        &st,
        Query::Subscriptions {
            after,
            limit,
            search: search_of(p.q)?,
        },
        Vec::new(),
        |mut v, _, a| {
            if let Answer::Subscriptions(p) = a {
                v.push(p);
            }
            v
        },
    )
    .await?;
    let (total, items, more) = merge(pages, limit, |s| (s.filter.clone(), s.client_id.clone()));
    let next = more
        .then(|| {
            items.last().map(|s| SubscriptionCursor {
                after_filter: s.filter.clone(),
                after_client: s.client_id.clone(),
            })
        })
        .flatten();
    Ok(Json(Listing { total, items, next }))
}

async fn retained(
    State(st): State<Shared>,
    UrlQuery(p): UrlQuery<RetainedParams>,
) -> Result<Json<Listing<RetainedInfo, String>>, ApiError> {
    let limit = limit_of(p.limit)?;
    let query = Query::Retained {
        after: p.after,
        limit,
        search: search_of(p.q)?,
        sys: p.sys.unwrap_or(true),
    };
    let pages = gather(&st, query, Vec::new(), |mut v, _, a| {
        if let Answer::Retained(p) = a {
            v.push(p);
        }
        v
    })
    .await?;
    let (total, items, more) = merge(pages, limit, |r| r.topic.clone());
    let next = more
        .then(|| items.last().map(|r| r.topic.clone()))
        .flatten();
    Ok(Json(Listing { total, items, next }))
}

/// `POST /api/cluster/nodes/{node}/failover` (needs the admin token): gives every slot of
/// a node that is down to the live nodes; its sessions start over, empty, there.
async fn failover(
    State(st): State<Shared>,
    Path(node): Path<String>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    authorize(&st, &headers)?;
    let Some(c) = &st.info.cluster else {
        return Err(ApiError(StatusCode::NOT_FOUND, "not a cluster node".into()));
    };
    use crate::cluster::FailoverError as E;
    match c.failover(&node).await {
        Ok(done) => Ok(Json(serde_json::json!({ "node": node, "done": done }))),
        Err(E::Unknown(m)) => Err(ApiError(StatusCode::NOT_FOUND, m)),
        Err(E::Live(m)) => Err(ApiError(StatusCode::CONFLICT, m)),
        Err(E::Unavailable(m)) => Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, m)),
    }
}

/// `GET /api/cluster`: every node with its addresses, state, share of the slots and link
/// health; `{"enabled": false}` for a broker that runs alone.
async fn cluster(State(st): State<Shared>) -> Json<serde_json::Value> {
    match &st.info.cluster {
        Some(c) => {
            let mut v = serde_json::to_value(c.view()).unwrap_or_default();
            if let Some(o) = v.as_object_mut() {
                o.insert("enabled".into(), true.into());
            }
            Json(v)
        }
        None => Json(serde_json::json!({ "enabled": false })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_added_up_by_step_across_shards() {
        let p = |step, received| RatePoint {
            step,
            received,
            sent: 0,
            bytes_in: 0,
            bytes_out: 0,
        };
        let step_s = RATE_STEP_MS / 1000;
        // Shard 0 sampled every step; shard 1 missed step 11.
        let shards = vec![
            vec![p(10, 0), p(11, 10 * step_s), p(12, 30 * step_s)],
            vec![p(10, 0), p(12, 40 * step_s)],
        ];
        let r = sum_rates(&shards);
        assert_eq!(r.len(), 2);
        assert_eq!(
            (r[0].unix_ms, r[0].received_per_s),
            (11 * RATE_STEP_MS, 10.0)
        );
        assert_eq!(
            (r[1].unix_ms, r[1].received_per_s),
            (12 * RATE_STEP_MS, 40.0)
        );
        assert!(sum_rates(&[vec![p(1, 5)]]).is_empty());
    }

    #[test]
    fn only_localhost_ip_literals_and_allowed_names_are_served() {
        let allowed = vec!["broker.example".to_string(), "other.example.".to_string()];
        for ok in [
            "localhost",
            "LOCALHOST:8080",
            "localhost.",
            "127.0.0.1",
            "127.0.0.1:8080",
            "10.1.2.3:80",
            "[::1]",
            "[::1]:8080",
            "broker.example",
            "Broker.Example:9000",
            "other.example",
            "other.example.:80",
        ] {
            assert!(host_allowed(ok, &allowed), "{ok}");
        }
        for bad in [
            "rebind.attacker.test",
            "rebind.attacker.test:8080",
            "localhost.attacker.test",
            "127.0.0.1.attacker.test",
            "[::1",
            "[::1]x",
            "[zz]:80",
            "localhost:http",
            "localhost:",
            "",
            "broker.example.evil",
        ] {
            assert!(!host_allowed(bad, &allowed), "{bad}");
        }
    }
}
