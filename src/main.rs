//! The `wandist` command: run, check, reload, certs, demo.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

/// mimalloc: the relay path allocates and frees many short buffers across
/// threads; glibc's malloc spent measurable time there (see BENCHMARKS.md).
/// Run with MIMALLOC_ARENA_EAGER_COMMIT=0 (the Dockerfile does) for the
/// smallest idle footprint.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit code for a configuration that cannot be used (EX_USAGE... EX_DATAERR family).
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "wandist",
    version,
    about = "A gateway that bridges disjoint Erlang/OTP clusters over mutual-TLS links"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway until SIGTERM or SIGINT; SIGHUP reloads the configuration.
    Run {
        #[arg(long, short)]
        config: PathBuf,
        /// `text` (default), or `json`: one JSON object per line, with the
        /// fields of the text lines (also WANDIST_LOG_FORMAT).
        #[arg(long, env = "WANDIST_LOG_FORMAT", default_value = "text")]
        log_format: LogFormat,
    },
    /// Load and validate everything `run` would, without binding a port.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check the configuration, then make the gateways running with it
    /// (`wandist run --config` the same file) reload it: SIGHUP.
    Reload {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Show a running gateway's state (its /status) as tables: routes,
    /// links, Erlang nodes, groups; exit 0 if it is ready, 1 if not.
    Status {
        /// The gateway's metrics address, e.g. http://127.0.0.1:9100.
        #[arg(long, conflicts_with = "config")]
        url: Option<String>,
        /// The gateway's configuration (its [metrics] listen is asked).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Print the JSON as the gateway sends it.
        #[arg(long)]
        json: bool,
    },
    /// Exit 0 if the gateway is ready (its /readyz answers 200), or with
    /// --live alive (/healthz); 1 if not: for container health checks.
    Health {
        /// The gateway's metrics address, e.g. http://127.0.0.1:9570.
        #[arg(long, conflicts_with = "config")]
        url: Option<String>,
        /// The gateway's configuration (its [metrics] listen is asked).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Liveness (/healthz) instead of readiness (/readyz).
        #[arg(long)]
        live: bool,
    },
    /// Two Erlang clusters on loopback bridged by two gateways, shown working.
    Demo {
        /// Messages streamed while the primary link is cut.
        #[arg(long, default_value_t = 20_000)]
        messages: u32,
    },
    /// Make a development CA and one certificate per cluster in DIR; with
    /// --revoke, revoke the clusters' certificates in DIR instead (DIR/crl.pem,
    /// for every gateway's tls.crl) and issue them new ones from DIR's CA.
    Certs {
        #[arg(long)]
        out: PathBuf,
        /// Days the cluster certificates (and the CRL) stay valid.
        #[arg(long, default_value_t = wandist::certs::DEFAULT_DAYS, value_parser = clap::value_parser!(i64).range(1..=36_500))]
        days: i64,
        /// Revoke and reissue, with the CA already in DIR.
        #[arg(long)]
        revoke: bool,
        /// Make a new CA even if DIR has one (every cluster's certificates
        /// must then be made again); without it, the CA in DIR signs.
        #[arg(long)]
        force: bool,
        /// Give the files written to this user (UID or UID:GID), e.g. 10001
        /// for the container image's user (keys stay 0600: readable by it only).
        #[arg(long, value_name = "UID[:GID]")]
        owner: Option<String>,
        #[arg(required = true, value_name = "CLUSTER")]
        clusters: Vec<String>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => match wandist::gateway::prepare(&config) {
            Ok(prepared) => {
                let tls = prepared.tls.iter().flat_map(|t| t.warnings.iter().cloned());
                for w in prepared.config.warnings().into_iter().chain(tls) {
                    println!("warning: {w}");
                }
                println!("ok");
                ExitCode::SUCCESS
            }
            Err(problems) => {
                print_problems(&problems);
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Certs { out, days, revoke, force, owner, clusters } => {
            let owner = match owner.as_deref().map(parse_owner).transpose() {
                Ok(o) => o,
                Err(e) => {
                    eprintln!("wandist certs: --owner {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            certs(out, days, revoke, force, owner, clusters)
        }
        Command::Run { config, log_format } => run(config, log_format),
        Command::Reload { config } => reload(config),
        Command::Demo { messages } => demo(messages),
        Command::Status { url, config, json } => status(url, config, json),
        Command::Health { url, config, live } => health(url, config, live),
    }
}

/// `UID` or `UID:GID`.
fn parse_owner(s: &str) -> Result<(u32, Option<u32>), String> {
    let num = |x: &str| x.parse::<u32>().map_err(|_| format!("{s:?}: want UID or UID:GID (numbers)"));
    match s.split_once(':') {
        Some((u, g)) => Ok((num(u)?, Some(num(g)?))),
        None => Ok((num(s)?, None)),
    }
}

fn certs(
    out: PathBuf,
    days: i64,
    revoke: bool,
    force: bool,
    owner: Option<(u32, Option<u32>)>,
    clusters: Vec<String>,
) -> ExitCode {
    match if revoke {
        wandist::certs::revoke(&out, &clusters, days)
    } else if force {
        wandist::certs::generate_with_new_ca(&out, &clusters, days)
    } else {
        wandist::certs::generate_valid_for(&out, &clusters, days)
    } {
        Ok(paths) => {
            if !revoke && !paths.iter().any(|p| p.ends_with("ca.pem")) {
                println!("kept the CA in {} (--force makes a new one)", out.display());
            }
            for p in &paths {
                println!("wrote {}", p.display());
            }
            if let Some((uid, gid)) = owner {
                for p in &paths {
                    // The CA's key stays with whoever made it: a gateway never needs it.
                    if p.ends_with("ca.key") {
                        continue;
                    }
                    if let Err(e) = std::os::unix::fs::chown(p, Some(uid), gid) {
                        eprintln!(
                            "wandist certs: cannot give {} to {uid}: {e} (run as root, or chown it yourself)",
                            p.display()
                        );
                        return ExitCode::FAILURE;
                    }
                }
                println!("gave them to uid {uid} (but the CA key)");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("wandist certs: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The metrics address of `--url`, or of the `[metrics] listen` in
/// `--config` (for `wandist status` and `wandist health`).
fn metrics_address(what: &str, url: Option<String>, config: Option<PathBuf>) -> Result<String, ExitCode> {
    match (url, config) {
        (Some(url), _) => {
            Ok(url.trim_start_matches("http://").trim_end_matches('/').trim_end_matches("/metrics").to_string())
        }
        (None, Some(config)) => match wandist::config::Config::load(&config) {
            Ok(c) => match c.metrics {
                Some(m) if m.listen.port() != 0 => {
                    let ip = if m.listen.ip().is_unspecified() {
                        std::net::IpAddr::from([127, 0, 0, 1])
                    } else {
                        m.listen.ip()
                    };
                    Ok(std::net::SocketAddr::new(ip, m.listen.port()).to_string())
                }
                Some(_) => {
                    eprintln!("wandist {what}: [metrics] listen has port 0 in {}: give --url with the port the gateway logged (serving metrics addr=…)", config.display());
                    Err(ExitCode::from(EXIT_CONFIG))
                }
                None => {
                    eprintln!(
                        "wandist {what}: {} has no [metrics] listen: the gateway answers there",
                        config.display()
                    );
                    Err(ExitCode::from(EXIT_CONFIG))
                }
            },
            Err(problems) => {
                print_problems(&problems);
                Err(ExitCode::from(EXIT_CONFIG))
            }
        },
        (None, None) => {
            eprintln!("wandist {what}: give --url http://HOST:PORT or --config FILE");
            Err(ExitCode::from(EXIT_CONFIG))
        }
    }
}

/// `wandist health`.
fn health(url: Option<String>, config: Option<PathBuf>, live: bool) -> ExitCode {
    let addr = match metrics_address("health", url, config) {
        Ok(a) => a,
        Err(code) => return code,
    };
    let path = if live { "/healthz" } else { "/readyz" };
    match http_get(&addr, path) {
        Ok(body) => {
            print!("{body}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("wandist health: http://{addr}{path}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `wandist status`.
fn status(url: Option<String>, config: Option<PathBuf>, json: bool) -> ExitCode {
    let addr = match metrics_address("status", url, config) {
        Ok(a) => a,
        Err(code) => return code,
    };
    let body = match http_get(&addr, "/status") {
        Ok(body) => body,
        Err(e) => {
            eprintln!("wandist status: cannot get http://{addr}/status: {e}");
            return ExitCode::from(EXIT_UNAVAILABLE);
        }
    };
    let status: wandist::status::Status = match serde_json::from_str(&body) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("wandist status: http://{addr}/status did not answer a status: {e}");
            return ExitCode::from(EXIT_UNAVAILABLE);
        }
    };
    if json {
        print!("{body}");
    } else {
        print!("{}", wandist::status::render(&status));
    }
    if status.ready {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// A plain HTTP/1.1 GET, bounded in time and size: the body if 200.
fn http_get(addr: &str, path: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let timeout = std::time::Duration::from_secs(5);
    let to =
        std::net::ToSocketAddrs::to_socket_addrs(addr)?.next().ok_or_else(|| std::io::Error::other("no address"))?;
    let mut s = std::net::TcpStream::connect_timeout(&to, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut raw = Vec::new();
    s.take(64 << 20).read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| std::io::Error::other("no HTTP answer"))?;
    let status = head.lines().next().unwrap_or_default();
    if !status.contains(" 200 ") {
        return Err(std::io::Error::other(format!("{status}: {}", body.trim())));
    }
    Ok(body.to_string())
}

fn demo(messages: u32) -> ExitCode {
    init_logging("error", LogFormat::Text);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(wandist::demo::run(messages));
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("wandist demo: {e}");
            ExitCode::from(EXIT_UNAVAILABLE)
        }
    }
}

/// Exit code when something the demo needs is missing (EX_UNAVAILABLE).
const EXIT_UNAVAILABLE: u8 = 69;

fn init_logging(default: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WANDIST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        // The event's fields at the top level, next to timestamp, level
        // and target; no span lists (the text lines have none either).
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).with_span_list(false).init(),
    }
}

fn run(config: PathBuf, log_format: LogFormat) -> ExitCode {
    let prepared = match wandist::gateway::prepare(&config) {
        Ok(p) => p,
        Err(problems) => {
            for p in &problems {
                eprintln!("{p}");
            }
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    init_logging("info", log_format);
    let tls = prepared.tls.iter().flat_map(|t| t.warnings.iter().cloned());
    for w in prepared.config.warnings().into_iter().chain(tls) {
        tracing::warn!("{w}");
    }
    let metrics = wandist::metrics::Metrics::new();
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let threads = wandist::gateway::worker_threads(prepared.config.gateway.worker_threads, cpus);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(threads);
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let (reload_tx, reloads) = tokio::sync::mpsc::channel(1);
        tokio::spawn(watch_signals(shutdown.clone(), reload_tx));
        wandist::app::run(prepared, metrics, shutdown, reloads).await
    });
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// SIGTERM or SIGINT: shut down. SIGHUP: reload (several at once are one
/// reload); it never stops the process.
async fn watch_signals(shutdown: CancellationToken, reload: tokio::sync::mpsc::Sender<()>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let (term, hup) = (signal(SignalKind::terminate()), signal(SignalKind::hangup()));
        let (mut term, mut hup) = match (term, hup) {
            (Ok(t), Ok(h)) => (t, h),
            (t, h) => {
                let e = t.err().or(h.err()).map(|e| e.to_string()).unwrap_or_default();
                tracing::warn!("cannot watch SIGTERM and SIGHUP ({e}); SIGINT only");
                let _ = tokio::signal::ctrl_c().await;
                return shutdown.cancel();
            }
        };
        loop {
            tokio::select! {
                _ = term.recv() => { tracing::info!("SIGTERM received"); break; }
                _ = tokio::signal::ctrl_c() => { tracing::info!("SIGINT received"); break; }
                _ = hup.recv() => {
                    tracing::info!("SIGHUP received");
                    let _ = reload.try_send(());
                }
            }
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
    shutdown.cancel();
}

/// `check`'s report: one `FILE:LINE: message` per problem, on stdout.
fn print_problems(problems: &[wandist::config::Problem]) {
    for p in problems {
        println!("{p}");
    }
}

/// `wandist reload`: the file must pass `check` first (a bad file would be
/// refused by the gateway too, but here the operator sees why at once);
/// then every `wandist run` process of this user with the same file gets
/// SIGHUP.
fn reload(config: PathBuf) -> ExitCode {
    if let Err(problems) = wandist::gateway::prepare(&config) {
        print_problems(&problems);
        println!("not reloaded: the running configuration is kept");
        return ExitCode::from(EXIT_CONFIG);
    }
    let pids = match wandist::signal::running_with(&config) {
        Ok(pids) => pids,
        Err(e) => {
            eprintln!("wandist reload: {e}");
            return ExitCode::FAILURE;
        }
    };
    if pids.is_empty() {
        eprintln!("wandist reload: no `wandist run --config {}` is running", config.display());
        return ExitCode::FAILURE;
    }
    let mut ok = true;
    for pid in pids {
        match wandist::signal::hangup(pid) {
            Ok(()) => println!("sent SIGHUP to {pid}"),
            Err(e) => {
                eprintln!("wandist reload: cannot signal {pid}: {e}");
                ok = false;
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
