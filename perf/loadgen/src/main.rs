//! `shardmq-loadgen`: an MQTT 3.1.1/5.0 load generator. See `perf/README.md`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a load generator, not the broker: a broken invariant here ends the run loudly"
)]

mod cli;
mod clock;
mod engine;
mod mqtt;
mod report;
mod scenarios;
mod stats;

use anyhow::{anyhow, bail, Result};
use clap::Parser;
use cli::{Args, Scenario};
use engine::Ctx;
use std::io::Write;
use std::net::{SocketAddr, ToSocketAddrs};
use std::process::ExitCode;
use std::sync::Arc;

/// Resolves the target at `port` and refuses anything but loopback unless allowed.
fn target(args: &Args, port: u16) -> Result<SocketAddr> {
    let addrs: Vec<SocketAddr> = (args.host.as_str(), port)
        .to_socket_addrs()
        .map_err(|e| anyhow!("cannot resolve {}: {e}", args.host))?
        .collect();
    let Some(&first) = addrs.first() else {
        bail!("{} resolves to no address", args.host);
    };
    if !args.allow_remote {
        if let Some(bad) = addrs.iter().find(|a| !a.ip().is_loopback()) {
            bail!(
                "{} ({}) is not a loopback address; pass --allow-remote to load a remote broker",
                args.host,
                bad.ip()
            );
        }
    }
    Ok(first)
}

/// Raises the open-file limit to its hard limit (idle and backlog hold many sockets).
fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit to fill and then to read.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur
}

/// Checks a `--pub-ids`/`--sub-ids` list against the count given with it.
fn check_ids(flag: &str, ids: Option<&Vec<String>>, count: Option<usize>) -> Result<()> {
    let Some(ids) = ids else {
        return Ok(());
    };
    if ids.is_empty() || ids.iter().any(String::is_empty) {
        bail!("--{flag}: give at least one client ID, none empty");
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(dup) = ids.iter().find(|id| !seen.insert(id.as_str())) {
        bail!("--{flag}: client ID {dup:?} appears twice");
    }
    if let Some(n) = count {
        if n != ids.len() {
            bail!(
                "--{flag} names {} client IDs but the count given is {n}",
                ids.len()
            );
        }
    }
    Ok(())
}

fn run(args: Args) -> Result<report::Report> {
    let addr = target(&args, args.port)?;
    let pub_addr = match args.pub_port {
        Some(p) => target(&args, p)?,
        None => addr,
    };
    let sub_addr = match args.sub_port {
        Some(p) => target(&args, p)?,
        None => addr,
    };
    check_ids("pub-ids", args.pub_ids.as_ref(), args.publishers)?;
    check_ids("sub-ids", args.sub_ids.as_ref(), args.subscribers)?;
    let d = args.duration_s();
    if !(d > 0.0 && d <= 3600.0) {
        bail!("--duration must be in (0, 3600] seconds");
    }
    if !(args.drain_timeout >= 0.0 && args.drain_timeout <= 3600.0) {
        bail!("--drain-timeout must be in [0, 3600] seconds");
    }
    if let Some(r) = args.rate {
        if !(r > 0.0 && r.is_finite()) {
            bail!("--rate must be a positive number of msgs/s");
        }
    }
    if args.threads == 0 {
        bail!("--threads must be at least 1");
    }
    let nofile = raise_nofile();
    let conns = match args.scenario {
        Scenario::Idle => args.connections.unwrap_or(1000),
        Scenario::Backlog => args
            .subscribers
            .or(args.sub_ids.as_ref().map(Vec::len))
            .unwrap_or(1000) as u64,
        _ => 0,
    };
    if conns + 64 > nofile {
        bail!(
            "{conns} connections need more open files than the limit ({nofile}); raise ulimit -n"
        );
    }
    let tag = {
        let t = clock::now_ns() ^ (u64::from(std::process::id()) << 32);
        let mut s = String::new();
        let mut v = t % 36u64.pow(5);
        for _ in 0..5 {
            s.push(char::from_digit((v % 36) as u32, 36).expect("digit"));
            v /= 36;
        }
        s
    };
    let ctx = Arc::new(Ctx {
        probe: stats::BrokerProbe(args.broker_pid),
        args,
        addr,
        pub_addr,
        sub_addr,
        tag,
        errors: Default::default(),
        progress: Default::default(),
    });
    ctx.probe.sample()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(ctx.args.threads)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match ctx.args.scenario {
            Scenario::FanIn | Scenario::FanOut | Scenario::P2p | Scenario::Durable => {
                scenarios::pubsub(ctx).await
            }
            Scenario::Backlog => scenarios::backlog(ctx).await,
            Scenario::Idle => scenarios::idle(ctx).await,
            Scenario::Storm => scenarios::storm(ctx).await,
        }
    })
}

fn main() -> ExitCode {
    let args = Args::parse();
    let json = args.json;
    match run(args) {
        Ok(rep) => {
            let text = if json {
                serde_json::to_string_pretty(&rep).expect("report serializes")
            } else {
                rep.table()
            };
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "shardmq-loadgen: {e:#}");
            ExitCode::FAILURE
        }
    }
}
