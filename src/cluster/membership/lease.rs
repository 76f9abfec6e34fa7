//! Keeping this node's etcd lease: renewals on the lease's schedule, also while a long
//! operation or an etcd call waits, and fencing when it is lost.

use super::*;

impl Node {
    /// Waits for `f` while renewing the lease on its schedule (a move may take longer
    /// than the lease's time to live).
    pub(super) async fn renewing<T>(
        &mut self,
        keys: &Keys,
        handle: &ClusterHandle,
        f: impl std::future::Future<Output = T>,
    ) -> T {
        let mut f = std::pin::pin!(f);
        let every = renew_interval(&self.cfg);
        // On the lease's own schedule (from its last renewal), not from now: a run of
        // waits each shorter than the interval must not add up past the time to live.
        let mut next = self.lease_at + every;
        loop {
            tokio::select! {
                r = &mut f => return r,
                _ = tokio::time::sleep_until(next.into()) => {
                    let cfg = self.cfg.clone();
                    let before = self.lease_at;
                    self.renew(keys, handle, &cfg).await;
                    // Not renewed (it retried inside, then gave up or fenced): as before,
                    // again an interval from now.
                    next = if self.lease_at > before {
                        self.lease_at + every
                    } else {
                        Instant::now() + every
                    };
                }
            }
        }
    }

    /// Renews the lease; after a loss, joins again with a fresh one.
    pub(super) async fn renew(&mut self, keys: &Keys, handle: &ClusterHandle, cfg: &ClusterConfig) {
        let ttl = Duration::from_secs(cfg.lease_ttl_s as u64);
        self.restore_endpoints().await;
        let fenced = handle.lock().state == SelfState::Fenced;
        // A failed keep-alive (an etcd member gone, an election under way) is tried again
        // soon, not a whole interval later: the lease has only its time to live.
        loop {
            match self.keep_alive().await {
                Ok(left) if left > 0 => {
                    if fenced && !self.record_is_ours(keys).await {
                        // The lease lives but the record went (an operator deleted it):
                        // claim the id again.
                        break;
                    }
                    let mut st = handle.lock();
                    // From when it was asked for: etcd counted from a moment after.
                    st.renewed = Some(self.lease_at);
                    if fenced {
                        // The lease outlived the trouble and the record with it: this node
                        // was never replaced. It serves again (its clients, disconnected
                        // when it fenced itself, come back).
                        st.state = SelfState::Up;
                        st.live.insert(self.record.id.clone(), self.record.clone());
                        tracing::info!(node = %self.record.id, "the cluster lease is held again");
                    }
                    return;
                }
                Ok(_) => {
                    self.fence(handle, "etcd says the lease has expired");
                    break;
                }
                Err(e) => {
                    self.rest_endpoint(&format!("{e:?}")).await;
                    // Past its time to live by this node's clock the shards already serve
                    // nothing (`LeaseClock`), but etcd may still hold the lease: it restarts
                    // every countdown when a new etcd leader takes over. An unanswered
                    // keep-alive (a dead member, an election) is no proof of loss; only
                    // etcd's "expired" is, or no answer for a second time to live (a node
                    // already fenced rejoins after one).
                    let overdue = {
                        let mut st = handle.lock();
                        st.counters.etcd_errors_total += 1;
                        let bound = if fenced { ttl } else { ttl * 2 };
                        st.renewed.is_none_or(|t| t.elapsed() >= bound)
                    };
                    if overdue {
                        self.fence(handle, &format!("not renewed for {}s ({e})", ttl.as_secs()));
                        break;
                    }
                    tokio::time::sleep(RENEW_RETRY).await;
                }
            }
        }
        match self.claim(keys, handle).await {
            Ok(()) => tracing::info!(node = %self.record.id, "rejoined the cluster"),
            Err(Claim::Fatal(e)) => tracing::error!(error = %e, "cannot rejoin the cluster"),
            Err(Claim::Etcd(_)) => handle.lock().counters.etcd_errors_total += 1,
        }
    }

    /// One keep-alive; the lease's remaining time to live (0: it is gone).
    pub(super) async fn keep_alive(&mut self) -> Result<i64, etcd_client::Error> {
        let asked = Instant::now();
        let mut client = self.client.clone();
        let lease = self.lease;
        let once = async move {
            let (mut keeper, mut stream) = client.lease_keep_alive(lease).await?;
            keeper.keep_alive().await?;
            match stream.message().await? {
                Some(r) => Ok(r.ttl()),
                None => Err(etcd_client::Error::LeaseKeepAliveError(
                    "the keep-alive stream ended without an answer".into(),
                )),
            }
        };
        // etcd answers TTL 0 when the lease has expired; the client reports that on the
        // stream's first answer as the error "lease not found".
        let once = async move {
            match once.await {
                Err(e) if e.to_string().contains("lease not found") => Ok(0),
                r => r,
            }
        };
        // Never longer than a renewal interval: a slow etcd must not hold up the watch.
        let bound = self.timeout.min(
            Duration::from_millis(self.record.lease_ttl_s as u64 * 1000 / 6)
                .max(Duration::from_millis(500)),
        );
        let r = match tokio::time::timeout(bound, once).await {
            Ok(r) => r,
            Err(_) => Err(etcd_client::Error::InvalidArgs(
                "keep-alive timed out".into(),
            )),
        };
        if let Ok(left) = r {
            if left > 0 {
                // etcd restarted the countdown after it was asked: from the asking, the
                // lease surely holds for `left` seconds.
                self.lease_at = asked;
                self.clock
                    .hold_until(asked + Duration::from_secs(left as u64));
            }
        }
        r
    }

    /// Marks this node fenced (once per loss).
    pub(super) fn fence(&self, handle: &ClusterHandle, why: &str) {
        self.clock.drop_now();
        let mut st = handle.lock();
        if st.state != SelfState::Fenced {
            st.state = SelfState::Fenced;
            st.counters.lease_lost_total += 1;
            st.live.remove(&self.record.id);
            tracing::error!(
                node = %self.record.id,
                reason = why,
                "lost the cluster lease: serving nothing this node owns until it rejoins"
            );
        }
    }

    /// An etcd call with the request timeout. While it waits (a write waits out an etcd
    /// election, up to the timeout, and callers retry), the lease is kept alive on its
    /// schedule: the membership loop, which renews it otherwise, is held up meanwhile.
    pub(super) async fn call<T>(
        &mut self,
        f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, Claim> {
        let mut f = std::pin::pin!(tokio::time::timeout(self.timeout, f));
        let every = renew_interval(&self.cfg);
        let mut next = self.lease_at + every;
        loop {
            tokio::select! {
                r = &mut f => {
                    return match r {
                        Ok(Ok(v)) => Ok(v),
                        Ok(Err(e)) => Err(Claim::Etcd(e.to_string())),
                        Err(_) => Err(Claim::Etcd("timed out".into())),
                    };
                }
                _ = tokio::time::sleep_until(next.into()) => {
                    // Only a held lease; the loss and the rejoin are `renew`'s.
                    if self.handle.lock().state != SelfState::Up {
                        next = Instant::now() + every;
                        continue;
                    }
                    match self.keep_alive().await {
                        Ok(left) if left > 0 => {
                            self.handle.lock().renewed = Some(self.lease_at);
                            next = self.lease_at + every;
                        }
                        _ => next = Instant::now() + RENEW_RETRY,
                    }
                }
            }
        }
    }
}
