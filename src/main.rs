//! The `flowgate` command: `serve`, `migrate`, `demo`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use flowgate::clock::Clock;
use flowgate::config::Settings;
use flowgate::gateway::Gateway;
use flowgate::store::Store;

/// A real-time access and credit gateway.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        /// The TOML configuration.
        #[arg(long, default_value = "config/flowgate.toml")]
        config: PathBuf,
    },
    /// Apply the store's migrations and exit.
    Migrate {
        /// The TOML configuration (its `store.url`, or FLOWGATE_STORE_URL).
        #[arg(long, default_value = "config/flowgate.toml")]
        config: PathBuf,
    },
    /// Watch the waterfall work: a mock backend, a gateway on a temporary SQLite file, one user.
    Demo,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let quiet = matches!(cli.command, Command::Demo);
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FLOWGATE_LOG")
                .unwrap_or_else(|_| if quiet { "warn".into() } else { "info".into() }),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Serve { config } => serve(config).await,
        Command::Migrate { config } => migrate(config).await,
        Command::Demo => flowgate::demo::run().await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("flowgate: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: PathBuf) -> Result<(), Box<dyn std::error::Error>> {
    let settings = Settings::load(&config)?;
    let listener = tokio::net::TcpListener::bind(settings.server.listen).await?;
    let gateway = Gateway::start(settings, listener, Clock::System).await?;
    shutdown_signal().await;
    tracing::info!("shutdown signal received");
    gateway.shutdown().await;
    Ok(())
}

async fn migrate(config: PathBuf) -> Result<(), Box<dyn std::error::Error>> {
    let settings = Settings::load(&config)?;
    Store::open(&settings.store.url).await?.migrate().await?;
    println!("migrations applied");
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return interrupt.await.unwrap_or(()),
            };
        tokio::select! {
            _ = interrupt => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}
