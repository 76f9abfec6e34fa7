//! How many shards to run, where, and with which per-executor limits.
//!
//! Defaults follow what was measured on the target machines (see the project's stack notes):
//! a 2 ms preemption timer instead of glommio's 100 ms, about 1 MiB of locked I/O memory and a
//! ring depth well under the 8192 that still fits an unprivileged 8 MiB memlock limit.

use std::time::Duration;

use crate::error::StartError;

/// Default [`Config::preempt_timer`]: glommio's 100 ms lets one busy task starve timers and
/// sockets of its shard for that long.
pub const PREEMPT_TIMER_DEFAULT: Duration = Duration::from_millis(2);

/// Default [`Config::io_memory_bytes`]: small enough that many shards fit an unprivileged
/// memlock limit; storage goes through fjall, not glommio's DMA files.
pub const IO_MEMORY_BYTES_DEFAULT: usize = 1 << 20;

/// Default [`Config::ring_depth`].
pub const RING_DEPTH_DEFAULT: usize = 1024;

/// Largest accepted [`Config::ring_depth`]: deeper rings lock more memory than an
/// unprivileged 8 MiB memlock limit allows.
pub const RING_DEPTH_MAX: usize = 8192;

/// Default [`Config::mesh_capacity`]: messages are batches, so a thousand batches in flight
/// per pair of shards is ample and costs little memory.
pub const MESH_CAPACITY_DEFAULT: usize = 1024;

/// Largest accepted [`Config::mesh_capacity`]: the mesh holds `count * (count - 1)` rings.
pub const MESH_CAPACITY_MAX: usize = 1 << 16;

/// Default [`Config::nudge_interval`]: bounds the stall glommio 0.9's lost wake-up can cause
/// to 10 ms. Each nudge of an idle shard costs a wake-up: about 0.8% of a core per idle shard
/// (measured, release build); busy shards pay nothing.
pub const NUDGE_INTERVAL_DEFAULT: Duration = Duration::from_millis(10);

/// Shortest accepted [`Config::nudge_interval`]: shorter only burns the idle shards' CPU.
pub const NUDGE_INTERVAL_MIN: Duration = Duration::from_micros(500);

/// Largest accepted shard count: the mesh grows with the square of the count.
pub const SHARD_COUNT_MAX: usize = 256;

/// Longest accepted [`Config::thread_name_prefix`]: Linux thread names hold 15 bytes, and
/// the shard index is appended after a dash.
pub const THREAD_NAME_PREFIX_MAX: usize = 10;

/// Where shards run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placement {
    /// One shard per listed core, shard `i` on `cores[i]`: the thread-per-core layout that
    /// keeps caches warm and avoids migrations. Cores must be distinct and allowed by the
    /// process's CPU affinity mask.
    Pinned(Vec<usize>),
    /// `n` shards that the kernel may move between cores (`--no-pin`): for machines where
    /// pinning is not allowed, containers with shared CPUs, and tests.
    Unpinned(usize),
}

impl Placement {
    /// The number of shards this placement creates.
    pub fn shard_count(&self) -> usize {
        match self {
            Placement::Pinned(cores) => cores.len(),
            Placement::Unpinned(count) => *count,
        }
    }

    /// The core shard `index` is pinned to, if any.
    pub fn core_of(&self, index: usize) -> Option<usize> {
        match self {
            Placement::Pinned(cores) => cores.get(index).copied(),
            Placement::Unpinned(_) => None,
        }
    }
}

/// Settings for the pool and for each of its executors.
#[derive(Clone, Debug)]
pub struct Config {
    /// How many shards and on which cores.
    pub placement: Placement,
    /// How long a task queue may run before glommio asks it to yield; bounds the latency a
    /// CPU-bound task adds to every other connection of its shard.
    pub preempt_timer: Duration,
    /// Memory glommio preallocates and registers with io_uring; it is locked memory, so it
    /// counts against `RLIMIT_MEMLOCK`.
    pub io_memory_bytes: usize,
    /// Submission depth of each io_uring; bounds in-flight I/O per shard and locked memory.
    pub ring_depth: usize,
    /// Threads are named `<prefix>-<shard index>` so that `top -H`, `perf` and panic messages
    /// say which shard is which.
    pub thread_name_prefix: String,
    /// Slots in each shard-to-shard ring (rounded up to a power of two); a sender waits when
    /// its ring is full, which is the mesh's backpressure.
    pub mesh_capacity: usize,
    /// How often a helper thread wakes every shard, so that glommio 0.9.0's lost wake-up
    /// (an executor parking with a runnable task, glommio/glommio#53) stalls a shard for at
    /// most this long instead of forever. `None` turns the nudger off: only for a glommio
    /// with the fix.
    pub nudge_interval: Option<Duration>,
}

impl Config {
    /// A config with the default limits for the given placement.
    pub fn new(placement: Placement) -> Self {
        Self {
            placement,
            preempt_timer: PREEMPT_TIMER_DEFAULT,
            io_memory_bytes: IO_MEMORY_BYTES_DEFAULT,
            ring_depth: RING_DEPTH_DEFAULT,
            thread_name_prefix: String::from("shard"),
            mesh_capacity: MESH_CAPACITY_DEFAULT,
            nudge_interval: Some(NUDGE_INTERVAL_DEFAULT),
        }
    }

    /// Checks the limits and how they relate, and that pinned cores exist, are distinct and
    /// are allowed for this process, so that a bad value is reported in one line before any
    /// thread starts.
    pub fn validate(&self) -> Result<(), StartError> {
        let count = self.placement.shard_count();
        if count == 0 || count > SHARD_COUNT_MAX {
            return Err(StartError::ShardCount {
                count,
                max: SHARD_COUNT_MAX,
            });
        }
        if self.ring_depth == 0 || self.ring_depth > RING_DEPTH_MAX {
            return Err(StartError::RingDepth {
                ring_depth: self.ring_depth,
                max: RING_DEPTH_MAX,
            });
        }
        if self.mesh_capacity == 0 || self.mesh_capacity > MESH_CAPACITY_MAX {
            return Err(StartError::MeshCapacity {
                capacity: self.mesh_capacity,
                max: MESH_CAPACITY_MAX,
            });
        }
        if self.preempt_timer.is_zero() {
            return Err(StartError::PreemptTimer);
        }
        if let Some(interval) = self.nudge_interval {
            if interval < NUDGE_INTERVAL_MIN {
                return Err(StartError::NudgeInterval {
                    interval,
                    min: NUDGE_INTERVAL_MIN,
                });
            }
        }
        if self.thread_name_prefix.len() > THREAD_NAME_PREFIX_MAX {
            return Err(StartError::ThreadName {
                prefix: self.thread_name_prefix.clone(),
                max: THREAD_NAME_PREFIX_MAX,
            });
        }
        if let Placement::Pinned(cores) = &self.placement {
            for (index, core) in cores.iter().enumerate() {
                if cores[..index].contains(core) {
                    return Err(StartError::DuplicateCore { core: *core });
                }
            }
            // Without the mask (sched_getaffinity failed) glommio's own check still runs.
            if let Some(allowed) = allowed_cores() {
                for (index, core) in cores.iter().enumerate() {
                    if !allowed.contains(core) {
                        return Err(StartError::CoreUnavailable {
                            shard: crate::ShardId::new(index),
                            core: *core,
                            allowed,
                        });
                    }
                }
            }
        }
        Ok(())
    }
}

/// The cores the calling thread may run on, which is the process's mask unless the caller
/// pinned itself.
fn allowed_cores() -> Option<Vec<usize>> {
    // SAFETY: cpu_set_t is plain data, valid when zeroed; sched_getaffinity writes at most
    // size_of::<cpu_set_t>() bytes into it; CPU_ISSET reads within CPU_SETSIZE.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return None;
        }
        let size = usize::try_from(libc::CPU_SETSIZE).unwrap_or(0);
        Some(
            (0..size)
                .filter(|core| libc::CPU_ISSET(*core, &set))
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Config::new(Placement::Unpinned(2)).validate().unwrap();
    }

    #[test]
    fn limits_are_enforced() {
        let mut config = Config::new(Placement::Unpinned(0));
        assert!(matches!(
            config.validate(),
            Err(StartError::ShardCount { .. })
        ));
        config.placement = Placement::Unpinned(1);
        config.ring_depth = RING_DEPTH_MAX + 1;
        assert!(matches!(
            config.validate(),
            Err(StartError::RingDepth { .. })
        ));
        config.ring_depth = RING_DEPTH_DEFAULT;
        config.mesh_capacity = 0;
        assert!(matches!(
            config.validate(),
            Err(StartError::MeshCapacity { .. })
        ));
        config.mesh_capacity = MESH_CAPACITY_DEFAULT;
        config.nudge_interval = Some(Duration::from_micros(10));
        assert!(matches!(
            config.validate(),
            Err(StartError::NudgeInterval { .. })
        ));
        config.nudge_interval = None;
        config.validate().unwrap();
        config.placement = Placement::Pinned(vec![0, 0]);
        assert!(matches!(
            config.validate(),
            Err(StartError::DuplicateCore { core: 0 })
        ));
    }
}
