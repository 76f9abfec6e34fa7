//! Route changes and their acknowledgements: a local subscription's filter announced to
//! every node, answered once each has it (or went away); barriers after a route set.

use super::*;

impl Plane {
    /// A shard gained or lost `filter`: the other nodes hear when the node as a whole
    /// did; a SUBACK (`ack`) waits for every linked node to have applied it.
    pub(super) fn local_route(
        &mut self,
        filter: Arc<str>,
        shard: u16,
        add: bool,
        ack: Option<Reply>,
    ) {
        let shards = self.local_routes.entry(filter.clone()).or_default();
        let announce = if add {
            let first = shards.is_empty();
            shards.insert(shard as usize);
            first || ack.is_some()
        } else {
            shards.remove(shard as usize);
            let gone = shards.is_empty();
            if gone {
                self.local_routes.remove(&filter);
            }
            gone
        };
        if !announce {
            return;
        }
        let linked: Vec<NodeIx> = self.links.keys().copied().collect();
        let ack_id = self.wait_for(ack, &linked);
        for n in linked {
            wire::route(self.buf(n), add, ack_id, &filter);
        }
    }

    /// An id under which `ack` waits for an answer from each of `nodes` (0 when nothing
    /// waits; answered at once when there is no node to wait for).
    pub(super) fn wait_for(&mut self, ack: Option<Reply>, nodes: &[NodeIx]) -> u64 {
        match ack {
            Some(r) if !nodes.is_empty() => {
                self.next_id += 1;
                let id = self.next_id;
                self.route_waits
                    .insert(id, (r, nodes.len(), nodes.to_vec()));
                self.route_deadlines
                    .push_back((Instant::now() + ROUTE_ACK_TIMEOUT, id));
                id
            }
            Some(r) => {
                self.answer(r, true, Fate::default());
                0
            }
            None => 0,
        }
    }

    /// Answers a node's route once every shard here has applied it (see
    /// [`Plane::start_barrier`]).
    pub(super) fn answer_route_after_barrier(&mut self, node: &str, ack: u64) {
        // Past the bound the asker goes on after its own timeout.
        if self.route_acks.len() < ROUTES_PER_NODE_MAX {
            self.route_acks.push((node.to_string(), ack));
        }
    }

    /// One barrier query behind this pass's posts in each shard's inbox answers every route
    /// asked for so far; at most one is under way (a peer sending many routes that want an
    /// answer costs one query per pass, never a thread each).
    pub(super) fn start_barrier(&mut self) {
        if self.barrier_busy || self.route_acks.is_empty() {
            return;
        }
        self.barrier_busy = true;
        let acks = std::mem::take(&mut self.route_acks);
        let control = self.control.clone();
        let events = self.events.clone();
        tokio::task::spawn_blocking(move || {
            let applied = control
                .map_reduce(
                    Query::Cluster(Vec::new()),
                    ROUTE_ACK_TIMEOUT,
                    (),
                    |(), _, _| (),
                )
                .is_ok();
            let _ = events.blocking_send(LinkEvent::RouteApplied { acks, applied });
        });
    }

    /// A wait for answers ends; the nodes that did not answer a release missed it.
    pub(super) fn end_wait(&mut self, id: u64) -> Option<Reply> {
        let (r, _, nodes) = self.route_waits.remove(&id)?;
        if let Some((origin, pid)) = self.releases.remove(&id) {
            for n in nodes {
                self.miss_release(n, &origin, pid);
            }
        }
        Some(r)
    }

    /// `n` answered the wait `id` (or its link went down: `answered` false).
    pub(super) fn route_ack_from(&mut self, id: u64, n: NodeIx) {
        self.wait_answered(id, n, true);
    }

    pub(super) fn wait_answered(&mut self, id: u64, n: NodeIx, answered: bool) {
        if !answered {
            if let Some((origin, pid)) = self.releases.get(&id).cloned() {
                if self
                    .route_waits
                    .get(&id)
                    .is_some_and(|(_, _, ns)| ns.contains(&n))
                {
                    self.miss_release(n, &origin, pid);
                }
            }
        }
        let done = match self.route_waits.get_mut(&id) {
            Some((_, left, nodes)) => {
                nodes.retain(|x| *x != n);
                *left = nodes.len();
                *left == 0
            }
            None => false,
        };
        if done {
            if let Some(r) = self.end_wait(id) {
                self.answer(r, true, Fate::default());
            }
        }
    }
}
