//! The `shardmq` command: flags and config file in, a running broker out.
//!
//! `shardmq [--config FILE] [--listen ADDR:PORT]... [--cores LIST | --shards N] [--no-pin]
//! [--data-dir DIR] [--log-level LEVEL] [--admin-listen ADDR:PORT | --no-admin]`; `shardmq check-config FILE`; `shardmq convert-mosquitto-conf FILE`; `shardmq passwd [--stdin] FILE USER`.
//! A wrong flag or value exits 2 with one line naming it; a failure to start exits 1 with one line. When every
//! shard listens, one line goes to stdout: `shardmq ready listeners=ADDR[,ADDR] shards=N tcp=ADDR[,ADDR]`
//! (and `tls=`, `ws=`, `wss=` with the addresses of those listeners, then `admin=ADDR` when the
//! admin endpoint is on),
//! and systemd (when `NOTIFY_SOCKET` is set) is told `READY=1`.
//!
//! Stop: the first SIGINT/SIGTERM tells systemd `STOPPING=1` and stops the broker in order
//! (exit 0), bounded by [`STOP_TIMEOUT`]; a second signal exits at once with status 130.
//! Either way nothing acknowledged is lost: acknowledgements wait for the disk.

use clap::{Parser, Subcommand};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use shardmq::auth::Auth;
use shardmq::broker::{listeners_of, Broker, StartError};
use shardmq::config::{check_log_filter, Config, Transport};

/// How long an orderly stop may take before the process exits anyway (status 1). Covers the
/// connections' grace period and the last fsync; config/shardmq.service's TimeoutStopSec is
/// above it.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "shardmq",
    version,
    about = "A thread-per-core MQTT broker with durable sessions"
)]
struct Cli {
    /// TOML configuration file (see config/shardmq.toml); flags override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Listen on ADDR:PORT (repeatable). Default 127.0.0.1:1883.
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Vec<SocketAddr>,
    /// Pin one shard to each listed core, e.g. 0-3,6.
    #[arg(long, value_name = "LIST", conflicts_with = "shards")]
    cores: Option<String>,
    /// Run N shards on the first N available cores.
    #[arg(long, value_name = "N")]
    shards: Option<usize>,
    /// Do not pin shards to cores.
    #[arg(long)]
    no_pin: bool,
    /// Directory for each shard's data (<DIR>/shard-<n>/).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Log level (off, error, warn, info, debug, trace) or filter ("info,shardmq=debug").
    /// Overrides RUST_LOG, which overrides the config's log.level.
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<String>,
    /// Serve the admin API, metrics and dashboard on ADDR:PORT (when `admin.enabled`, the
    /// default). Default 127.0.0.1:8080.
    #[arg(long, value_name = "ADDR:PORT", conflicts_with = "no_admin")]
    admin_listen: Option<SocketAddr>,
    /// Do not serve the admin endpoint.
    #[arg(long)]
    no_admin: bool,
    /// Run as cluster node ID (unique in the cluster, stable across restarts).
    #[arg(long, value_name = "ID")]
    cluster_node: Option<String>,
    /// The node-to-node address this node listens on.
    #[arg(long, value_name = "ADDR:PORT")]
    cluster_listen: Option<SocketAddr>,
    /// The node-to-node address other nodes dial, where it differs from --cluster-listen.
    #[arg(long, value_name = "ADDR:PORT")]
    cluster_advertise: Option<SocketAddr>,
    /// etcd client URLs, comma-separated (http://HOST:PORT,...).
    #[arg(long, value_name = "URL[,URL...]", value_delimiter = ',')]
    cluster_etcd: Vec<String>,
    /// Seconds a node may be silent (since its last lease renewal) before its sessions move
    /// to the survivors (0: never).
    #[arg(long, value_name = "SECONDS")]
    cluster_failover_after: Option<u32>,
    /// NATS JetStream URLs, comma-separated (nats://HOST:PORT,...): replicate sessions.
    #[arg(long, value_name = "URL[,URL...]", value_delimiter = ',')]
    cluster_jetstream: Vec<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Validate a config file (and the password and ACL files it names) and print the
    /// effective configuration.
    CheckConfig { file: PathBuf },
    /// Print the shardmq configuration equivalent to a Mosquitto configuration FILE, with
    /// every line it cannot carry over named, and why.
    ConvertMosquittoConf { file: PathBuf },
    /// Create or update USER's entry in the password FILE (argon2id). The password is read
    /// from the terminal without echo, or as one line from standard input.
    Passwd {
        file: PathBuf,
        user: String,
        /// Read the password as one line from standard input even on a terminal.
        #[arg(long)]
        stdin: bool,
    },
}

/// The password for `shardmq passwd`: typed twice on a terminal, else one line of stdin.
fn read_password(force_stdin: bool) -> Result<String, String> {
    use std::io::IsTerminal;
    if !force_stdin && std::io::stdin().is_terminal() {
        let first = rpassword::prompt_password("Password: ").map_err(|e| e.to_string())?;
        let again = rpassword::prompt_password("Again: ").map_err(|e| e.to_string())?;
        if first != again {
            return Err("the passwords differ".into());
        }
        return Ok(first);
    }
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .map_err(|e| format!("cannot read the password: {e}"))?;
    let line = line.strip_suffix('\n').unwrap_or(&line);
    Ok(line.strip_suffix('\r').unwrap_or(line).to_string())
}

fn passwd(file: &Path, user: &str, force_stdin: bool) -> ExitCode {
    let password = match read_password(force_stdin) {
        Ok(p) if p.is_empty() => return fail(2, "empty password"),
        Ok(p) => p,
        Err(e) => return fail(1, e),
    };
    let hash = match shardmq::auth::password::hash_argon2id(password.as_bytes()) {
        Ok(h) => h,
        Err(e) => return fail(1, e),
    };
    match shardmq::auth::password::set_entry(file, user, &hash) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(1, e),
    }
}

fn fail(code: u8, msg: impl std::fmt::Display) -> ExitCode {
    let _ = writeln!(std::io::stderr(), "shardmq: {msg}");
    ExitCode::from(code)
}

fn load(path: &PathBuf) -> Result<Config, String> {
    let cfg = load_unchecked(path)?;
    cfg.validate()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(cfg)
}

/// The file parsed, not yet validated (flags may complete it).
fn load_unchecked(path: &PathBuf) -> Result<Config, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Config::from_toml_unchecked(&text).map_err(|e| format!("{}: {e}", path.display()))
}

fn main() -> ExitCode {
    let cli = match parse_cli() {
        Ok(c) => c,
        Err(code) => return code,
    };
    match &cli.command {
        Some(Command::Passwd { file, user, stdin }) => return passwd(file, user, *stdin),
        Some(Command::ConvertMosquittoConf { file }) => return convert_mosquitto_conf(file),
        Some(Command::CheckConfig { file }) => return check_config(file),
        None => {}
    }
    let cfg = match effective_config(&cli) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let auth = match Auth::load(&cfg) {
        Ok(a) => std::sync::Arc::new(a),
        Err(e) => return fail(2, e),
    };
    let filter = match log_filter(cli.log_level.as_deref(), &cfg.log.level) {
        Ok(f) => f,
        Err(e) => return fail(2, e),
    };
    init_logging(filter);

    // Installed before the shards start and before the ready line, so that a SIGTERM sent
    // as soon as the broker reports ready (or while it starts) is an orderly stop, not the
    // default action (death by signal). Signals arriving before the thread below runs wait.
    let signals = match signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ]) {
        Ok(s) => s,
        Err(e) => return fail(1, format!("cannot install signal handlers: {e}")),
    };
    let reload_cfg = cfg.clone();
    let broker = match Broker::start_with_auth(cfg, auth) {
        Ok(b) => b,
        Err(e @ StartError::Listener(_)) => return fail(2, e),
        Err(e) => return fail(1, e),
    };
    announce_ready(&broker);

    // When the stop was asked for, for the last line's duration.
    let stop_requested: &'static std::sync::OnceLock<std::time::Instant> =
        Box::leak(Box::new(std::sync::OnceLock::new()));
    spawn_signal_thread(&broker, signals, reload_cfg, stop_requested);
    let result = broker.join();
    if let Some(t) = stop_requested.get() {
        tracing::info!(ms = t.elapsed().as_millis() as u64, "stopped");
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(1, format!("shard failure: {e}")),
    }
}

/// Parses the command line; `--help`/`--version` print and exit 0, an error exits 2 with
/// its first line.
fn parse_cli() -> Result<Cli, ExitCode> {
    match Cli::try_parse() {
        Ok(c) => Ok(c),
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            Err(ExitCode::SUCCESS)
        }
        Err(e) => {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            Err(fail(2, first.trim_start_matches("error: ")))
        }
    }
}

/// `shardmq convert-mosquitto-conf FILE`: prints the converted configuration, and each line
/// not carried over to stderr.
fn convert_mosquitto_conf(file: &Path) -> ExitCode {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => return fail(2, format!("{}: {e}", file.display())),
    };
    let converted = shardmq::mosquitto::convert(&text);
    let out = shardmq::mosquitto::render(&converted, &file.display().to_string());
    let _ = std::io::stdout().write_all(out.as_bytes());
    for n in &converted.skipped {
        eprintln!("{}:{}: not carried over: {}", file.display(), n.line, n.why);
    }
    ExitCode::SUCCESS
}

/// `shardmq check-config FILE`: validates the file (and the files it names) and prints the
/// effective configuration.
fn check_config(file: &PathBuf) -> ExitCode {
    match load(file).and_then(|c| Auth::load(&c).map(|_| c).map_err(|e| e.to_string())) {
        Ok(cfg) => {
            if let Err(e) = listeners_of(&cfg) {
                return fail(2, format!("{}: {e}", file.display()));
            }
            let text = toml::to_string_pretty(&cfg).unwrap_or_default();
            let _ = std::io::stdout().write_all(text.as_bytes());
            ExitCode::SUCCESS
        }
        Err(e) => fail(2, e),
    }
}

/// The configuration to run: the `--config` file (or the defaults) with the flags applied,
/// validated; an error exits 2.
fn effective_config(cli: &Cli) -> Result<Config, ExitCode> {
    let mut cfg = match &cli.config {
        Some(p) => match load_unchecked(p) {
            Ok(c) => c,
            Err(e) => return Err(fail(2, e)),
        },
        None => Config::default(),
    };
    apply_flags(cli, &mut cfg);
    if let Err(e) = cfg.validate() {
        return Err(match &cli.config {
            Some(p) => fail(2, format!("{} (with the flags): {e}", p.display())),
            None => fail(2, e),
        });
    }
    Ok(cfg)
}

/// Overrides the configuration's settings with the flags given.
fn apply_flags(cli: &Cli, cfg: &mut Config) {
    if !cli.listen.is_empty() {
        cfg.listen = cli.listen.clone();
    }
    if let Some(c) = &cli.cores {
        cfg.shards.cores = Some(c.clone());
        cfg.shards.count = None;
    }
    if let Some(n) = cli.shards {
        cfg.shards.count = Some(n);
        cfg.shards.cores = None;
    }
    if cli.no_pin {
        cfg.shards.pin = false;
    }
    if let Some(d) = &cli.data_dir {
        cfg.data_dir = d.clone();
    }
    if let Some(a) = cli.admin_listen {
        cfg.admin.listen = a;
    }
    if cli.no_admin {
        cfg.admin.enabled = false;
    }
    if let Some(n) = &cli.cluster_node {
        cfg.cluster.node = Some(n.clone());
    }
    if let Some(a) = cli.cluster_listen {
        cfg.cluster.listen = Some(a);
    }
    if let Some(a) = cli.cluster_advertise {
        cfg.cluster.advertise = Some(a);
    }
    if !cli.cluster_etcd.is_empty() {
        cfg.cluster.etcd = cli.cluster_etcd.clone();
    }
    if let Some(s) = cli.cluster_failover_after {
        cfg.cluster.failover_after_s = s;
    }
    if !cli.cluster_jetstream.is_empty() {
        cfg.cluster.jetstream = cli.cluster_jetstream.clone();
    }
}

/// Logs to stderr through `filter`, in colour only on a terminal without `NO_COLOR`.
fn init_logging(filter: tracing_subscriber::EnvFilter) {
    // Colour only for a terminal, and not with NO_COLOR set (https://no-color.org):
    // journald and log files get plain text.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour)
        .init();
}

/// Logs where the shards and listeners are, prints the ready line and tells systemd.
fn announce_ready(broker: &Broker) {
    for (i, core) in broker.cores.iter().enumerate() {
        match core {
            Some(c) => tracing::info!("shard {i} on core {c}"),
            None => tracing::info!("shard {i} unpinned"),
        }
    }
    let addrs: Vec<String> = broker
        .listeners
        .iter()
        .map(|l| l.addr.to_string())
        .collect();
    tracing::info!("listening on {}", addrs.join(", "));
    let by_transport = addresses_by_transport(broker);
    let admin = match broker.admin_addr {
        Some(a) => {
            tracing::info!("admin endpoint on http://{a}/");
            format!(" admin={a}")
        }
        None => String::new(),
    };
    let cluster = match &broker.cluster {
        Some(c) => {
            let j = &c.joined;
            tracing::info!(
                "cluster node {} on {} (etcd {}; members {})",
                j.node,
                c.link_addr,
                j.etcd.join(","),
                j.members.join(",")
            );
            format!(
                " node={} cluster={} etcd={} members={}",
                j.node,
                c.link_addr,
                j.etcd.join(","),
                j.members.join(",")
            )
        }
        None => String::new(),
    };
    let _ = writeln!(
        std::io::stdout(),
        "shardmq ready listeners={} shards={}{by_transport}{admin}{cluster}",
        addrs.join(","),
        broker.cores.len()
    );
    let _ = std::io::stdout().flush();
    // A no-op unless systemd (Type=notify) set NOTIFY_SOCKET.
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        tracing::warn!(error = %e, "cannot notify systemd (READY=1)");
    }
}

/// The ready line's ` tcp=ADDR[,ADDR]` (then `tls=`, `ws=`, `wss=`) parts, for the
/// transports that have listeners.
fn addresses_by_transport(broker: &Broker) -> String {
    // Each transport's addresses, so that a client started with port 0 finds its own.
    let mut by_transport = String::new();
    for t in [
        Transport::Tcp,
        Transport::Tls,
        Transport::Ws,
        Transport::Wss,
    ] {
        let of_t: Vec<String> = broker
            .listeners
            .iter()
            .filter(|l| l.transport == t)
            .map(|l| l.addr.to_string())
            .collect();
        if !of_t.is_empty() {
            by_transport.push_str(&format!(" {}={}", t.name(), of_t.join(",")));
        }
    }
    by_transport
}

/// Starts the thread that handles signals. First SIGINT/SIGTERM: orderly stop, bounded.
/// Second: exit at once. SIGHUP: reload the password and ACL files (a bad file is logged
/// and the old rules stay).
fn spawn_signal_thread(
    broker: &Broker,
    mut signals: signal_hook::iterator::Signals,
    reload_cfg: Config,
    stop_requested: &'static std::sync::OnceLock<std::time::Instant>,
) {
    let control = broker.control();
    let cluster = broker.cluster.as_ref().map(|c| c.handle());
    let hand_over_s = reload_cfg.cluster.hand_over_timeout_s;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut seen = 0;
            for sig in signals.forever() {
                if sig == signal_hook::consts::SIGHUP {
                    match Broker::reload_auth(&control, &reload_cfg) {
                        Ok(()) => tracing::info!("reloaded the password and ACL files"),
                        Err(e) => tracing::error!("reload failed, old rules kept: {e}"),
                    }
                    continue;
                }
                seen += 1;
                if seen == 1 {
                    let _ = stop_requested.set(std::time::Instant::now());
                    tracing::info!(signal = sig, "stopping");
                    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Stopping]) {
                        tracing::warn!(error = %e, "cannot notify systemd (STOPPING=1)");
                    }
                    // A cluster node first hands its sessions to the other nodes (bounded),
                    // so that none of them waits for it to return; on its own thread, so
                    // that a second signal still exits at once meanwhile.
                    let (cluster, control) = (cluster.clone(), control.clone());
                    let stop = move || {
                        if let Some(c) = cluster.as_ref().filter(|_| hand_over_s > 0) {
                            let bound = Duration::from_secs(hand_over_s as u64);
                            match c.hand_over(bound) {
                                Ok(what) => tracing::info!("left the cluster: {what}"),
                                Err(e) => tracing::warn!(
                                    "could not hand this node's sessions over ({e}); they wait for its return or a fail-over"
                                ),
                            }
                        }
                        control.stop();
                        spawn_stop_timeout();
                    };
                    if std::thread::Builder::new()
                        .name("stopping".into())
                        .spawn(stop)
                        .is_err()
                    {
                        tracing::error!("cannot start the stop; exiting");
                        std::process::exit(1);
                    }
                } else {
                    tracing::warn!(signal = sig, "second signal: exiting at once");
                    std::process::exit(130);
                }
            }
        })
        .ok();
}

/// Starts the thread that exits (status 1) if the orderly stop takes over [`STOP_TIMEOUT`].
fn spawn_stop_timeout() {
    let _ = std::thread::Builder::new()
        .name("stop-timeout".into())
        .spawn(|| {
            // A bound, not a synchronisation: the orderly stop exits first.
            std::thread::sleep(STOP_TIMEOUT);
            tracing::error!("the orderly stop did not finish within {STOP_TIMEOUT:?}; exiting");
            std::process::exit(1);
        });
}

/// The log filter: `--log-level`, else `RUST_LOG` (when set and not empty), else the
/// config's `log.level` (already validated). An invalid one is one line naming its source.
fn log_filter(flag: Option<&str>, config: &str) -> Result<tracing_subscriber::EnvFilter, String> {
    let env = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty());
    let (source, text) = match (flag, env.as_deref()) {
        (Some(f), _) => ("--log-level", f),
        (None, Some(e)) => ("RUST_LOG", e),
        (None, None) => ("log.level", config),
    };
    check_log_filter(text).map_err(|e| format!("{source}: {e}"))?;
    let mut filter = tracing_subscriber::EnvFilter::builder()
        .parse(text)
        .map_err(|e| format!("{source}: invalid log filter {text:?}: {e}"))?;
    // The storage engine's own lines (every table flush, journal rotation, recovery step)
    // only at warn, and none of the NATS client's (an error line per reconnect try; the
    // broker logs each new NATS error once), unless the filter asks for them by name.
    for (lib, level) in [
        ("fjall", "warn"),
        ("lsm_tree", "warn"),
        ("async_nats", "off"),
    ] {
        if !text.contains(lib) {
            if let Ok(d) = format!("{lib}={level}").parse() {
                filter = filter.add_directive(d);
            }
        }
    }
    Ok(filter)
}
