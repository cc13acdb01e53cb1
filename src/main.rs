//! The `switchyard` command: `serve` (default), `feed`, `simulate-exchange`,
//! `token`, `check-config`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use switchyard::auth;
use switchyard::config::Config;

/// jemalloc rather than glibc malloc: a node's hot paths allocate and free small
/// buffers across threads, where glibc spent a quarter of the instructions per
/// publication. Measured (docs/benchmarks.md, "Allocator"): 44,085 → 38,461
/// instructions per client publication, 20 → 18 µs of node CPU per publication from
/// one connection and 43 → 29 µs from 1,000, idle RSS 3,534–3,571 → 3,393 B.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "switchyard",
    version,
    about = "WebSocket gateway with ordered delivery and replay"
)]
struct Cli {
    /// Config file (TOML); `SWITCHYARD_SECTION__KEY` variables override it.
    #[arg(long, short, global = true, env = "SWITCHYARD_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run a gateway node (the default).
    Serve {
        /// Listen address, overriding `server.listen`.
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
    },
    /// Mint a development token signed with `auth.hmac_secret`.
    Token {
        #[arg(long)]
        user: String,
        /// Lifetime, e.g. 30m, 1h, 7d.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Capabilities `PATTERNS=PERMS`, e.g. `chat.>=sub+pub` or `chat.dm.{user}=sub`.
        #[arg(long, value_parser = auth::parse_cap)]
        caps: Vec<auth::Capability>,
    },
    /// Run the price feed's connectors as their own process (`[feed]`), publishing
    /// into the cluster; health on `feed.listen`.
    Feed,
    /// Run an exchange simulator speaking the KuCoin public protocol (tests, demos).
    SimulateExchange {
        /// REST address (`rest_url` for the connector is http://THIS).
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: std::net::SocketAddr,
        /// WebSocket address.
        #[arg(long, default_value = "127.0.0.1:9001")]
        ws_listen: std::net::SocketAddr,
        /// Ticks per second per symbol.
        #[arg(long, default_value_t = 10.0)]
        rate: f64,
        /// Comma-separated symbols.
        #[arg(long, default_value = "BTC-USDT,ETH-USDT", value_delimiter = ',')]
        symbols: Vec<String>,
    },
    /// Load and validate the configuration and read its key files, then exit.
    CheckConfig,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("switchyard: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command.unwrap_or(Command::Serve { listen: None }) {
        // The key files too: a config whose keys cannot be read is refused at start.
        Command::CheckConfig => match auth::Verifier::from_config(&config.auth) {
            Ok(_) => {
                println!(
                    "configuration is valid ({} namespaces)",
                    config.namespaces.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("switchyard: {e}");
                ExitCode::from(2)
            }
        },
        Command::Token { user, ttl, caps } => match auth::mint(&config, &user, ttl, caps) {
            Ok(token) => {
                println!("{token}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("switchyard: {e}");
                ExitCode::from(2)
            }
        },
        Command::Feed => feed(config),
        Command::SimulateExchange {
            listen,
            ws_listen,
            rate,
            symbols,
        } => simulate(config, listen, ws_listen, rate, symbols),
        Command::Serve { listen } => {
            if let Some(addr) = listen {
                config.server.listen = addr;
            }
            serve(config)
        }
    }
}

fn serve(mut config: Config) -> ExitCode {
    // Decided here: traces name the node (`service.instance.id`) before it starts.
    if config.server.node_id.is_empty() {
        config.server.node_id = switchyard::ids::random_node_id();
    }
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    switchyard::telemetry::init(&config.log, &config.server.node_id, Some(runtime.handle()));
    let code = runtime.block_on(async {
        let server = match switchyard::server::start(config).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("switchyard: {e}");
                return ExitCode::from(2);
            }
        };
        tracing::info!(addr = %server.addr, node = %server.node.id, "listening");
        if server.node.config.server.demo {
            tracing::warn!(
                url = %format!("http://{}/demo/", server.addr),
                "server.demo is on: POST /demo/token mints tokens for anyone; never in production"
            );
        }
        let shutdown = server.node.shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("signal received, draining");
            shutdown.trigger();
        });
        if let Err(e) = server.task.await {
            tracing::error!(error = %e, "server task failed");
            return ExitCode::FAILURE;
        }
        ExitCode::SUCCESS
    });
    // What the drain and the last requests traced is exported before the exit.
    switchyard::telemetry::shutdown();
    code
}

fn runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Runtime::new() {
        Ok(rt) => Some(rt),
        Err(e) => {
            eprintln!("switchyard: cannot start the runtime: {e}");
            None
        }
    }
}

fn feed(config: Config) -> ExitCode {
    let Some(rt) = runtime() else {
        return ExitCode::FAILURE;
    };
    let id = match config.server.node_id.as_str() {
        "" => switchyard::ids::random_node_id(),
        id => id.to_string(),
    };
    switchyard::telemetry::init(&config.log, &id, Some(rt.handle()));
    let code = rt.block_on(async {
        let feed = match switchyard::feed::standalone::start(config).await {
            Ok(f) => f,
            Err(e) => {
                eprintln!("switchyard: {e}");
                return ExitCode::from(2);
            }
        };
        tracing::info!(health = %feed.addr, "feed running");
        wait_for_signal().await;
        tracing::info!("signal received, stopping the feed");
        feed.shutdown.trigger();
        let _ = feed.task.await;
        ExitCode::SUCCESS
    });
    switchyard::telemetry::shutdown();
    code
}

fn simulate(
    config: Config,
    listen: std::net::SocketAddr,
    ws_listen: std::net::SocketAddr,
    rate: f64,
    symbols: Vec<String>,
) -> ExitCode {
    let Some(rt) = runtime() else {
        return ExitCode::FAILURE;
    };
    switchyard::telemetry::init(&config.log, "simulator", Some(rt.handle()));
    rt.block_on(async {
        use switchyard::feed::simulator::{Simulator, SimulatorOptions};
        let opts = SimulatorOptions {
            symbols,
            rate,
            ..SimulatorOptions::default()
        };
        let sim = match Simulator::start(opts, listen, ws_listen).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("switchyard: cannot start the simulator: {e}");
                return ExitCode::from(2);
            }
        };
        println!(
            "exchange simulator: rest_url = \"{}\" (websocket on {}); controls: POST /sim/drop, /sim/stall?on=true|false, /sim/malformed, /sim/refuse?n=N; GET /sim/stats",
            sim.rest_url, sim.ws_addr
        );
        wait_for_signal().await;
        ExitCode::SUCCESS
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
