//! One listener as the shards run it: its transport, its TLS settings (loaded and checked
//! once at start), its WebSocket path, and its limits, shared by every shard's accept loop.
//!
//! Per-listener limits are counted over all shards with atomics, not per-shard shares: a
//! limit of 2 must admit 2 connections even when the kernel (SO_REUSEPORT) sends both to the
//! same shard. The cost is one atomic read-modify-write per accepted and per closed
//! connection, on listeners that have a limit; nothing on the per-packet path.
//! - `connections_max` is exact: an accepted connection increments the count and, past the
//!   limit, undoes it and is closed. The count is released when the connection ends, on
//!   whichever shard served it (the permit travels with a handed-off socket).
//! - `connect_rate_per_s` is a GCRA (a token bucket kept as one "theoretical arrival time"
//!   in an atomic): sustained `rate` connections a second, bursts of up to `rate` at once.
//!   Exact up to the clock's resolution.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use futures_rustls::TlsAcceptor;

use crate::config::{ListenerConfig, Transport};

/// A listener's runtime settings.
pub struct Listener {
    /// The configured address (port 0 is resolved at bind).
    pub addr: SocketAddr,
    pub transport: Transport,
    /// How logs and errors name it, e.g. `listeners[1] (tls)`.
    pub name: String,
    /// Set for `tls` and `wss`.
    pub tls: Option<TlsAcceptor>,
    /// Whether a verified client certificate's subject becomes the username.
    pub identity_as_username: bool,
    /// The WebSocket endpoint (`ws` and `wss`).
    pub ws_path: String,
    pub limits: Arc<ListenerLimits>,
    /// A cluster node's relay listener: other nodes relay their clients of this node here,
    /// and a connection that came this way is never relayed again (two nodes that
    /// disagree for a moment about an owner must not bounce it between them).
    pub relayed: bool,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("addr", &self.addr)
            .field("transport", &self.transport)
            .field("name", &self.name)
            .finish()
    }
}

impl Listener {
    /// A plain TCP listener from `listen` (no limits of its own).
    pub fn plain(addr: SocketAddr) -> Listener {
        Listener {
            addr,
            transport: Transport::Tcp,
            name: format!("listen {addr}"),
            tls: None,
            identity_as_username: false,
            ws_path: String::new(),
            limits: Arc::new(ListenerLimits::new(None, None)),
            relayed: false,
        }
    }

    /// A cluster node's relay listener (plain TCP): see [`Listener::relayed`].
    pub fn relay(addr: SocketAddr) -> Listener {
        Listener {
            name: format!("cluster relay {addr}"),
            relayed: true,
            ..Listener::plain(addr)
        }
    }

    /// The `[[listeners]]` entry `index`, its certificate and key files read and checked.
    /// The error is one line naming the listener and the file.
    pub fn from_config(index: usize, cfg: &ListenerConfig) -> Result<Listener, String> {
        let name = format!(
            "listeners[{index}] ({} {})",
            cfg.transport.name(),
            cfg.address
        );
        let tls = if cfg.transport.is_tls() {
            let config = super::tls::server_config(cfg).map_err(|e| format!("{name}: {e}"))?;
            Some(TlsAcceptor::from(config))
        } else {
            None
        };
        Ok(Listener {
            addr: cfg.address,
            transport: cfg.transport,
            name,
            tls,
            identity_as_username: cfg.use_identity_as_username,
            ws_path: cfg.ws_path.clone(),
            limits: Arc::new(ListenerLimits::new(
                cfg.connections_max,
                cfg.connect_rate_per_s,
            )),
            relayed: false,
        })
    }
}

/// Why a new connection was closed at accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    ConnectionsMax,
    Rate,
}

/// A listener's connection count and connect rate, shared by every shard.
#[derive(Debug)]
pub struct ListenerLimits {
    connections_max: Option<u32>,
    open: AtomicU32,
    rate: Option<Gcra>,
}

impl ListenerLimits {
    pub fn new(connections_max: Option<u32>, rate_per_s: Option<u32>) -> ListenerLimits {
        ListenerLimits {
            connections_max,
            open: AtomicU32::new(0),
            rate: rate_per_s.map(Gcra::new),
        }
    }

    /// Admits a new connection, or says why not. The permit releases the count on drop.
    pub fn admit(self: &Arc<Self>) -> Result<Option<ListenerPermit>, Refusal> {
        if let Some(rate) = &self.rate {
            if !rate.admit() {
                return Err(Refusal::Rate);
            }
        }
        let Some(max) = self.connections_max else {
            return Ok(None);
        };
        if self.open.fetch_add(1, Ordering::AcqRel) >= max {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::ConnectionsMax);
        }
        Ok(Some(ListenerPermit(self.clone())))
    }

    /// Connections open now (counted only on listeners with `connections_max`).
    pub fn open(&self) -> u32 {
        self.open.load(Ordering::Acquire)
    }
}

/// One open connection of a listener with `connections_max`; dropping it releases it.
#[derive(Debug)]
pub struct ListenerPermit(Arc<ListenerLimits>);

impl Drop for ListenerPermit {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Generic cell rate algorithm: admits `rate` events a second with bursts of up to `rate`.
#[derive(Debug)]
struct Gcra {
    epoch: Instant,
    /// Nanoseconds between two events at the sustained rate.
    interval_ns: u64,
    /// How far ahead of now the theoretical arrival time may run (the burst).
    tolerance_ns: u64,
    /// Theoretical arrival time of the next event, in nanoseconds since `epoch`.
    tat_ns: AtomicU64,
}

impl Gcra {
    fn new(rate_per_s: u32) -> Gcra {
        let rate = rate_per_s.max(1) as u64;
        let interval_ns = 1_000_000_000 / rate;
        Gcra {
            epoch: Instant::now(),
            interval_ns,
            tolerance_ns: interval_ns * (rate - 1),
            tat_ns: AtomicU64::new(0),
        }
    }

    fn admit(&self) -> bool {
        self.admit_at(self.epoch.elapsed().as_nanos() as u64)
    }

    fn admit_at(&self, now_ns: u64) -> bool {
        let mut tat = self.tat_ns.load(Ordering::Acquire);
        loop {
            let start = tat.max(now_ns);
            if start - now_ns > self.tolerance_ns {
                return false;
            }
            match self.tat_ns.compare_exchange_weak(
                tat,
                start + self.interval_ns,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(t) => tat = t,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_admits_a_burst_then_the_sustained_rate() {
        let g = Gcra::new(4);
        let t0 = 10_000_000_000;
        for _ in 0..4 {
            assert!(g.admit_at(t0));
        }
        assert!(!g.admit_at(t0));
        // A quarter second later, one more.
        assert!(g.admit_at(t0 + 250_000_000));
        assert!(!g.admit_at(t0 + 250_000_000));
        // After a quiet second, a whole burst again.
        for _ in 0..4 {
            assert!(g.admit_at(t0 + 2_000_000_000));
        }
        assert!(!g.admit_at(t0 + 2_000_000_000));
    }

    #[test]
    fn connections_max_is_exact_and_released_on_drop() {
        let l = Arc::new(ListenerLimits::new(Some(2), None));
        let a = l.admit().unwrap();
        let b = l.admit().unwrap();
        assert_eq!(l.admit().unwrap_err(), Refusal::ConnectionsMax);
        assert_eq!(l.open(), 2);
        drop(a);
        let _c = l.admit().unwrap();
        drop(b);
        assert_eq!(l.open(), 1);
    }
}
