//! Latency histograms, error tallies, and the broker's (and our own) CPU and memory from
//! `/proc`.

use hdrhistogram::Histogram;
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// A latency histogram in nanoseconds, 1 µs to 1 hour, 3 significant figures.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1_000, 3_600_000_000_000, 3).expect("valid histogram bounds")
}

/// Records `ns`, clamped into the histogram's range.
pub fn record(h: &mut Histogram<u64>, ns: u64) {
    let v = ns.clamp(h.low(), h.high());
    h.record(v).expect("clamped value is in range");
}

/// Percentiles of a histogram, in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub count: u64,
    pub min_us: f64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Option<Latency> {
        if h.is_empty() {
            return None;
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        Some(Latency {
            count: h.len(),
            min_us: us(h.min()),
            mean_us: h.mean() / 1000.0,
            p50_us: us(h.value_at_quantile(0.50)),
            p90_us: us(h.value_at_quantile(0.90)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
        })
    }
}

/// Errors seen anywhere in the run: a count and the first few distinct messages.
#[derive(Debug, Default)]
pub struct Errors {
    count: AtomicU64,
    samples: Mutex<Vec<String>>,
}

impl Errors {
    pub fn add(&self, what: impl std::fmt::Display) {
        self.count.fetch_add(1, Ordering::Relaxed);
        let text = what.to_string();
        let mut s = self.samples.lock().expect("errors lock");
        if s.len() < 8 && !s.contains(&text) {
            s.push(text);
        }
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub fn samples(&self) -> Vec<String> {
        self.samples.lock().expect("errors lock").clone()
    }
}

/// CPU time and memory of one process, read from `/proc/PID/stat` and `/proc/PID/status`.
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct ProcSample {
    /// utime + stime, seconds.
    pub cpu_s: f64,
    /// VmRSS, bytes.
    pub rss_bytes: u64,
    /// VmHWM (peak resident set), bytes.
    pub hwm_bytes: u64,
}

pub fn proc_sample(pid: &str) -> std::io::Result<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name is in parentheses and may hold spaces: count fields after the last ')'.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| std::io::Error::other("unexpected /proc/PID/stat format"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Field 3 (state) is fields[0]; utime is field 14, stime field 15.
    let field = |i: usize| -> u64 { fields.get(i).and_then(|f| f.parse().ok()).unwrap_or(0) };
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let cpu_s = (field(11) + field(12)) as f64 / ticks;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb = |key: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(0, |k| k * 1024)
    };
    Ok(ProcSample {
        cpu_s,
        rss_bytes: kb("VmRSS:"),
        hwm_bytes: kb("VmHWM:"),
    })
}

/// The broker's figures before and after the measured part of a run.
#[derive(Debug, Clone, Serialize)]
pub struct BrokerStats {
    pub pid: u32,
    pub before: ProcSample,
    pub after: ProcSample,
    /// CPU seconds used during the measured part.
    pub cpu_s: f64,
    /// Peak RSS (VmHWM) at the end, bytes.
    pub peak_rss_bytes: u64,
    /// CPU seconds per million delivered (or, with no subscribers, acknowledged) messages.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_s_per_million_msgs: Option<f64>,
}

impl BrokerStats {
    pub fn between(pid: u32, before: ProcSample, after: ProcSample) -> BrokerStats {
        BrokerStats {
            pid,
            before,
            after,
            cpu_s: after.cpu_s - before.cpu_s,
            peak_rss_bytes: after.hwm_bytes,
            cpu_s_per_million_msgs: None,
        }
    }
}

/// Samples the broker's process when a PID was given.
#[derive(Debug, Clone, Copy)]
pub struct BrokerProbe(pub Option<u32>);

impl BrokerProbe {
    pub fn sample(&self) -> anyhow::Result<Option<ProcSample>> {
        match self.0 {
            None => Ok(None),
            Some(pid) => proc_sample(&pid.to_string())
                .map(Some)
                .map_err(|e| anyhow::anyhow!("cannot read /proc/{pid}: {e}")),
        }
    }
}

/// Our own process, to show whether the generator was the bottleneck.
pub fn self_sample() -> ProcSample {
    proc_sample("self").unwrap_or_default()
}
