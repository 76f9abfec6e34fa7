//! One clock for every timestamp: CLOCK_MONOTONIC in nanoseconds. Its epoch (boot) is shared by
//! every process on the machine, so a timestamp written into a payload by one run of the
//! generator (the backlog's fill phase) can be read by another (its drain phase).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;
use tokio::io::unix::AsyncFd;

/// Nanoseconds on CLOCK_MONOTONIC.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    debug_assert_eq!(rc, 0);
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The `tokio::time::Instant` that corresponds to `at_ns` on [`now_ns`]'s clock.
pub fn instant_at(at_ns: u64) -> tokio::time::Instant {
    let now_i = tokio::time::Instant::now();
    let now = now_ns();
    if at_ns >= now {
        now_i + Duration::from_nanos(at_ns - now)
    } else {
        now_i
            .checked_sub(Duration::from_nanos(now - at_ns))
            .unwrap_or(now_i)
    }
}

pub fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// A timer with the kernel's high-resolution precision (a `timerfd` on CLOCK_MONOTONIC,
/// absolute deadlines) instead of tokio's 1 ms wheel, so that open-loop sends leave within
/// tens of microseconds of their scheduled time without spinning.
#[derive(Debug)]
pub struct PreciseTimer {
    fd: AsyncFd<OwnedFd>,
}

impl PreciseTimer {
    pub fn new() -> std::io::Result<PreciseTimer> {
        // SAFETY: plain syscall; the result is checked before use.
        let raw = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new descriptor that nothing else owns.
        let owned = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: the descriptor is owned by the `AsyncFd` and closed only when it drops
        // (after it is deregistered); nothing else uses it.
        let fd = unsafe { AsyncFd::register(owned) }.map_err(std::io::Error::from)?;
        Ok(PreciseTimer { fd })
    }

    /// Returns at `at_ns` on [`now_ns`]'s clock (at once if it has passed). Cancel-safe: a
    /// later call re-arms the timer.
    pub async fn wait_until(&self, at_ns: u64) -> std::io::Result<()> {
        if at_ns <= now_ns() {
            return Ok(());
        }
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: (at_ns / 1_000_000_000) as libc::time_t,
                tv_nsec: (at_ns % 1_000_000_000) as libc::c_long,
            },
        };
        let fd = self.fd.get_ref().as_raw_fd();
        // SAFETY: `fd` is our timerfd and `spec` a valid itimerspec.
        let rc = unsafe {
            libc::timerfd_settime(fd, libc::TFD_TIMER_ABSTIME, &spec, std::ptr::null_mut())
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        loop {
            let mut guard = self.fd.readable().await?;
            let read = guard.try_io(|inner| {
                let mut ticks = [0u8; 8];
                // SAFETY: reads at most 8 bytes into `ticks`.
                let n = unsafe { libc::read(inner.as_raw_fd(), ticks.as_mut_ptr().cast(), 8) };
                if n < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(())
                }
            });
            match read {
                Ok(r) => return r,
                Err(_would_block) => {
                    // A stale readiness (an expiry consumed or reset by re-arming).
                    if now_ns() >= at_ns {
                        return Ok(());
                    }
                }
            }
        }
    }
}
