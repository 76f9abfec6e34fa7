//! The shard's cluster port: lease clock, shared groups over nodes, routes per node.

use super::*;
use crate::shard::core::tests_support::cluster_link as link;

#[test]
fn the_lease_clock_holds_until_its_deadline() {
    let c = LeaseClock::default();
    let now = Instant::now();
    assert!(!c.holds(now));
    c.hold_until(now + Duration::from_secs(3));
    assert!(c.holds(now));
    assert!(c.holds(now + Duration::from_millis(2999)));
    assert!(!c.holds(now + Duration::from_secs(3)));
    c.drop_now();
    assert!(!c.holds(now));
}

#[test]
fn each_shared_group_goes_to_one_node_in_turn_live_ones_first() {
    let (l, _rx) = link();
    let mut p = ClusterPort::new(l);
    let key: Arc<str> = Arc::from("$share/g/jobs/#");
    // Group keys arrive as routes, and are not plain filters.
    p.set_route(1, key.clone(), true);
    p.set_route(2, key.clone(), true);
    p.set_group(&key, None, true);
    assert!(p
        .routes
        .targets(&TopicName::new("jobs/x").unwrap())
        .is_empty());
    assert!(p.pick_groups("other").is_none());
    p.members.insert(1);
    p.members.insert(2);
    let mut count = [0usize; 3];
    for _ in 0..30 {
        let (here, there) = p.pick_groups("jobs/x").unwrap();
        assert_eq!(here.len() + there.len(), 1, "one node per group");
        match there.first() {
            Some((n, k)) => {
                assert_eq!(k, &key);
                count[*n as usize] += 1;
            }
            None => count[0] += 1,
        }
    }
    assert_eq!(count, [10, 10, 10], "here, node 1, node 2 in turn");
    // Node 2 is down: here and node 1 only.
    p.members.remove(2);
    for _ in 0..10 {
        let (_, there) = p.pick_groups("jobs/x").unwrap();
        assert!(there.iter().all(|(n, _)| *n == 1));
    }
    // No longer here, node 1 gone too: node 2 (down) is all there is (the forward
    // then fails, and the publisher hears it).
    p.set_group(&key, None, false);
    p.members.remove(1);
    p.set_route(1, key.clone(), false);
    let (here, there) = p.pick_groups("jobs/x").unwrap();
    assert!(here.is_empty());
    assert_eq!(there, vec![(2, key.clone())]);
    // Its node cleared: no group anywhere.
    p.clear_routes(2);
    assert!(p.pick_groups("jobs/x").is_none());
}

#[test]
fn routes_are_kept_per_node_and_forgotten_together() {
    let (l, _rx) = link();
    let mut p = ClusterPort::new(l);
    let t = |s: &str| TopicName::new(s).unwrap();
    p.set_route(1, Arc::from("a/+"), true);
    p.set_route(1, Arc::from("b/#"), true);
    p.set_route(2, Arc::from("a/x"), true);
    assert_eq!(
        p.routes.targets(&t("a/x")).iter().collect::<Vec<_>>(),
        vec![1, 2]
    );
    assert_eq!(
        p.routes.targets(&t("b/c/d")).iter().collect::<Vec<_>>(),
        vec![1]
    );
    // A second add and a remove of what is not there change nothing.
    p.set_route(1, Arc::from("a/+"), true);
    p.set_route(2, Arc::from("zzz"), false);
    p.clear_routes(1);
    assert_eq!(
        p.routes.targets(&t("a/x")).iter().collect::<Vec<_>>(),
        vec![2]
    );
    assert!(p.routes.targets(&t("b/c")).is_empty());
    p.set_route(2, Arc::from("a/x"), false);
    assert!(p.routes.targets(&t("a/x")).is_empty());
    // A whole set replaces the node's in one step: kept ones stay, gone ones go.
    p.set_route(3, Arc::from("k/1"), true);
    p.set_route(3, Arc::from("k/2"), true);
    p.replace_routes(3, &[Arc::from("k/2"), Arc::from("k/3")]);
    assert!(p.routes.targets(&t("k/1")).is_empty());
    assert_eq!(
        p.routes.targets(&t("k/2")).iter().collect::<Vec<_>>(),
        vec![3]
    );
    assert_eq!(
        p.routes.targets(&t("k/3")).iter().collect::<Vec<_>>(),
        vec![3]
    );
    // A node index past the bitmap is ignored, not a panic.
    p.set_route(NODES_MAX as NodeIx, Arc::from("a/x"), true);
    assert!(p.routes.targets(&t("a/x")).is_empty());
}
