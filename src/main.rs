//! The `flowgate` command: `serve`, `migrate`, `reconcile`, `replay`, `backup`, `restore`,
//! `demo`, `mock-openai`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use flowgate::clock::Clock;
use flowgate::config::{LogFormat, LogSettings, Settings};
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
    /// Re-derive charges and balances from the ledger's records and the configured prices;
    /// report every difference. Exits 1 if there is any.
    Reconcile {
        /// The TOML configuration (its store and its plans' prices).
        #[arg(long, default_value = "config/flowgate.toml")]
        config: PathBuf,
        /// Only events decided at or after this instant (RFC 3339); balances are always
        /// checked in full.
        #[arg(long)]
        since: Option<chrono::DateTime<chrono::Utc>>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// What-if: run the ledger's usage events through a candidate config's plans and prices,
    /// in their original order and at their original times, and report what would have been
    /// denied and charged. Reads the ledger only; writes nothing.
    Replay {
        /// The TOML configuration in force (its `store.url`, or FLOWGATE_STORE_URL).
        #[arg(long, default_value = "config/flowgate.toml")]
        config: PathBuf,
        /// The candidate configuration whose plans, windows and prices are replayed.
        #[arg(long)]
        candidate: PathBuf,
        /// Count only events decided at or after this instant (RFC 3339); earlier events are
        /// still replayed, so that windows and balances at this instant are the candidate's.
        #[arg(long)]
        from: Option<chrono::DateTime<chrono::Utc>>,
        /// Replay only events decided before this instant (RFC 3339).
        #[arg(long)]
        to: Option<chrono::DateTime<chrono::Utc>>,
        /// Count only this account (repeatable); every account is still replayed.
        #[arg(long = "account", value_name = "ID")]
        accounts: Vec<String>,
        /// Replay every account under this plan of the candidate.
        #[arg(long)]
        plan: Option<String>,
        /// How many of the most affected accounts to list.
        #[arg(long, default_value_t = 10)]
        top: usize,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Copy a SQLite ledger to a new file while the gateway serves (a consistent snapshot).
    Backup {
        /// The TOML configuration (its `store.url`, or FLOWGATE_STORE_URL).
        #[arg(long, default_value = "config/flowgate.toml")]
        config: PathBuf,
        /// The file to write; it must not exist.
        #[arg(long)]
        to: PathBuf,
    },
    /// Put a backup in place as the SQLite ledger, after checking it (stop the gateway first).
    Restore {
        /// The TOML configuration (its `store.url`, or FLOWGATE_STORE_URL).
        #[arg(long, default_value = "config/flowgate.toml")]
        config: PathBuf,
        /// The backup to restore.
        #[arg(long)]
        from: PathBuf,
        /// Replace an existing ledger file.
        #[arg(long)]
        force: bool,
    },
    /// Watch the waterfall work: a mock backend, a gateway on a temporary SQLite file, one user.
    Demo,
    /// Serve a small OpenAI-compatible API (chat completions, embeddings) with predictable
    /// token counts, for trying `config/examples/openai.toml`.
    MockOpenai {
        /// Where to listen.
        #[arg(long, default_value = "127.0.0.1:9100")]
        listen: std::net::SocketAddr,
    },
}

/// mimalloc rather than glibc's allocator, which took ~10 % of the gateway's CPU under load
/// (docs/BENCHMARKS.md): a request allocates and frees many small objects across threads.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { config } => match Settings::load(&config) {
            Ok(settings) => {
                let _logs = init_logs(&settings.log);
                serve(settings, &config).await
            }
            Err(e) => Err(e.into()),
        },
        Command::Migrate { config } => {
            let _logs = init_logs(&LogSettings::default());
            migrate(config).await
        }
        Command::Reconcile {
            config,
            since,
            json,
        } => {
            let _logs = init_logs(&LogSettings {
                level: "warn".into(),
                ..LogSettings::default()
            });
            match reconcile(config, since, json).await {
                Ok(true) => return ExitCode::SUCCESS,
                Ok(false) => return ExitCode::from(1),
                Err(e) => Err(e),
            }
        }
        Command::Replay {
            config,
            candidate,
            from,
            to,
            accounts,
            plan,
            top,
            json,
        } => {
            let _logs = init_logs(&LogSettings {
                level: "warn".into(),
                ..LogSettings::default()
            });
            let options = flowgate::replay::ReplayOptions {
                from: from.map_or(i64::MIN, |t| t.timestamp_millis()),
                to: to.map_or(i64::MAX, |t| t.timestamp_millis()),
                accounts: (!accounts.is_empty()).then(|| accounts.into_iter().collect()),
                plan,
                top,
            };
            replay(config, candidate, options, json).await
        }
        Command::Backup { config, to } => backup(config, to).await,
        Command::Restore {
            config,
            from,
            force,
        } => restore(config, from, force).await,
        Command::Demo => {
            let _logs = init_logs(&LogSettings {
                level: "warn".into(),
                ..LogSettings::default()
            });
            flowgate::demo::run().await
        }
        Command::MockOpenai { listen } => {
            match flowgate::demo::openai::MockOpenAi::start(listen).await {
                Ok(mock) => {
                    eprintln!("mock OpenAI-compatible API on {}", mock.url());
                    mock.wait().await;
                    Ok(())
                }
                Err(e) => Err(format!("cannot listen on {listen}: {e}").into()),
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("flowgate: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr, as `[log]` says; `FLOWGATE_LOG` overrides the level. Lines are gathered
/// in memory and written by a logging thread in large writes (`flowgate::logs`), so that a
/// request never waits on a `write` to stderr nor wakes a thread for its line. Keep the guard
/// until exit: dropping it writes what is still gathered.
fn init_logs(log: &LogSettings) -> flowgate::logs::LogGuard {
    let (writer, guard) = flowgate::logs::buffered(std::io::stderr());
    let filter = tracing_subscriber::EnvFilter::try_from_env("FLOWGATE_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&log.level))
        .unwrap_or_else(|_| "info".into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match log.format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
    guard
}

/// Serves until SIGINT or SIGTERM; on SIGHUP reads `config` again and reloads it (a file that
/// does not load is refused with the error start-up would give; the running one stays).
async fn serve(settings: Settings, config: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let listener = tokio::net::TcpListener::bind(settings.server.listen).await?;
    let gateway = Gateway::start(settings, listener, Clock::System).await?;
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    #[cfg(unix)]
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    loop {
        #[cfg(unix)]
        let hangup = hangups.recv();
        #[cfg(not(unix))]
        let hangup = std::future::pending::<Option<()>>();
        tokio::select! {
            () = &mut shutdown => break,
            _ = hangup => {
                tracing::info!(config = %config.display(), "SIGHUP: reloading the configuration");
                let reloaded = match Settings::load(config) {
                    Ok(settings) => gateway.reload(settings).await.map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                if let Err(error) = reloaded {
                    tracing::error!(%error, "configuration not reloaded; the running one stays in force");
                }
            }
        }
    }
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

async fn backup(config: PathBuf, to: PathBuf) -> Result<(), Box<dyn std::error::Error>> {
    let settings = Settings::load(&config)?;
    Store::open(&settings.store.url).await?.backup(&to).await?;
    println!("ledger copied to {}", to.display());
    Ok(())
}

async fn restore(
    config: PathBuf,
    from: PathBuf,
    force: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    let settings = Settings::load(&config)?;
    let events = Store::restore(&settings.store.url, &from, force).await?;
    println!(
        "restored {} ({events} usage events); run `flowgate reconcile` to check it",
        from.display()
    );
    Ok(())
}

/// Runs a reconciliation and prints it; `Ok(true)` when nothing differs.
async fn reconcile(
    config: PathBuf,
    since: Option<chrono::DateTime<chrono::Utc>>,
    json: bool,
) -> Result<bool, Box<dyn std::error::Error>> {
    let settings = Settings::load(&config)?;
    let store = Store::open_read_only(&settings.store.url).await?;
    let report = store
        .reconcile(since.map_or(i64::MIN, |t| t.timestamp_millis()), &settings)
        .await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for d in &report.differences {
            println!(
                "DIFF {:<28} account={} {}: expected {}, stored {}",
                d.check, d.account, d.record, d.expected, d.stored
            );
        }
        println!(
            "checked {} grants, {} balance updates, {} monetization events ({} with a price version neither the ledger nor the config has); {} differences",
            report.grants,
            report.balance_updates,
            report.monetization_events,
            report.unknown_price_versions,
            report.differences.len()
        );
    }
    Ok(report.differences.is_empty())
}

/// Runs a what-if replay and prints its report (and, for people, its speed on stderr).
async fn replay(
    config: PathBuf,
    candidate: PathBuf,
    options: flowgate::replay::ReplayOptions,
    json: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    if options.from >= options.to {
        return Err("--from must be before --to".into());
    }
    let current =
        Settings::load(&config).map_err(|e| format!("--config {}: {e}", config.display()))?;
    let candidate = Settings::load(&candidate)
        .map_err(|e| format!("--candidate {}: {e}", candidate.display()))?;
    let store = Store::open_read_only(&current.store.url).await?;
    let accounts = store.load_accounts().await?;
    let grants = store.grant_history().await?;
    let to = options.to;
    let mut replay =
        flowgate::replay::Replay::new(std::sync::Arc::new(candidate), &accounts, grants, options)?;
    let watch = flowgate::clock::Stopwatch::start();
    let read = store.replay_events(to, &mut |e| replay.push(e)).await?;
    let report = replay.finish();
    let seconds = watch.seconds();
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
        eprintln!(
            "replayed {read} events in {seconds:.2} s ({:.0} events/s)",
            read as f64 / seconds.max(1e-9)
        );
    }
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
