//! The `switchyard` command: `serve` (default), `token`, `check-config`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use switchyard::auth;
use switchyard::config::Config;

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
    /// Load and validate the configuration, then exit.
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
        Command::CheckConfig => {
            println!(
                "configuration is valid ({} namespaces)",
                config.namespaces.len()
            );
            ExitCode::SUCCESS
        }
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
        Command::Serve { listen } => {
            if let Some(addr) = listen {
                config.server.listen = addr;
            }
            serve(config)
        }
    }
}

fn serve(config: Config) -> ExitCode {
    switchyard::telemetry::init(&config.log);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("switchyard: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let server = match switchyard::server::start(config).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("switchyard: {e}");
                return ExitCode::from(2);
            }
        };
        tracing::info!(addr = %server.addr, node = %server.node.id, "listening");
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
