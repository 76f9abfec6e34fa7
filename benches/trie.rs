//! Topic matching against 100,000 subscriptions (`session::trie::TopicTrie`), the lookup every
//! PUBLISH makes on its shard.
//!
//! The filters model a fleet: 1,000 tenants × 100 devices, each device subscribed to its own
//! `t/<tenant>/d/<device>/cmd` (100,000 exact filters), plus per tenant one `t/<tenant>/d/+/cmd`
//! and one `t/<tenant>/#` (2,000 wildcard filters). Cases:
//! - `match/exact_and_wildcards`: a device's command topic; matches 3 filters (its own, the
//!   tenant's `+` and `#`).
//! - `match/no_subscriber`: a telemetry topic nobody but the tenant's `#` matches.
//! - `match/deep_miss`: a topic whose first level is unknown (ends at the root).
//! - `insert/100k`: building the whole trie (throughput in filters).
//!
//! `cargo bench --bench trie`; see perf/README.md.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests and benchmarks: a failure is the test's failure"
)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use shardmq::session::trie::TopicTrie;

const TENANTS: u32 = 1_000;
const DEVICES: u32 = 100;

fn filters() -> Vec<String> {
    let mut out = Vec::with_capacity((TENANTS * (DEVICES + 2)) as usize);
    for t in 0..TENANTS {
        for d in 0..DEVICES {
            out.push(format!("t/{t}/d/{d}/cmd"));
        }
        out.push(format!("t/{t}/d/+/cmd"));
        out.push(format!("t/{t}/#"));
    }
    out
}

fn build(filters: &[String]) -> TopicTrie<Vec<u32>> {
    let mut trie: TopicTrie<Vec<u32>> = TopicTrie::default();
    for (i, f) in filters.iter().enumerate() {
        trie.entry(f).push(i as u32);
    }
    trie
}

fn bench(c: &mut Criterion) {
    let filters = filters();
    let trie = build(&filters);
    assert_eq!(trie.len(), filters.len());
    let mut g = c.benchmark_group("trie");
    g.throughput(Throughput::Elements(1));
    for (name, topic, hits) in [
        ("match/exact_and_wildcards", "t/517/d/42/cmd", 3),
        ("match/no_subscriber", "t/517/d/42/telemetry", 1),
        ("match/deep_miss", "other/517/d/42/cmd", 0),
    ] {
        let mut n = 0;
        trie.for_each_match(topic, |v| n += v.len());
        assert_eq!(n, hits, "{topic}");
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut n = 0usize;
                trie.for_each_match(black_box(topic), |v| n += v.len());
                n
            })
        });
    }
    g.throughput(Throughput::Elements(filters.len() as u64));
    g.sample_size(10);
    g.bench_function("insert/100k", |b| b.iter(|| build(black_box(&filters))));
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_millis(1500))
        .sample_size(50);
    targets = bench
}
criterion_main!(benches);
