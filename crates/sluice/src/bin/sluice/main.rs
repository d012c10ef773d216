//! `sluice`: the command line. This is the binary's edge: errors become `anyhow` reports here.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

mod client;
use clap::{Parser, Subcommand};
use sluice::mock_upstream::{MockOptions, MockUpstream};
use sluice::upstream::sim::SimDefaults;
use sluice::{Config, Overrides, Server};

/// jemalloc rather than the system's malloc: with its purging thread on (see
/// [`return_freed_memory`]) memory freed after a spike goes back to the OS within seconds, where
/// glibc's malloc kept a spike's peak for good (docs/benchmarks/memory.md). The feature
/// `system-allocator` leaves it out, for heap profilers (`bash bench/idle-heap`).
#[cfg(all(unix, not(target_env = "musl"), not(feature = "system-allocator")))]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Turns on jemalloc's background purging: freed pages go back to the OS over its decay time
/// (10 s) even when the server is idle, instead of only when something allocates again.
fn return_freed_memory() {
    #[cfg(all(unix, not(target_env = "musl"), not(feature = "system-allocator")))]
    if let Err(e) = tikv_jemalloc_ctl::background_thread::write(true) {
        tracing::warn!("jemalloc background purging is off ({e}): memory after a spike is returned only as the server allocates");
    }
}

/// sluice: a streaming chat gateway for OpenAI-compatible clients.
#[derive(Debug, Parser)]
#[command(name = "sluice", version, about, long_about = None)]
struct Cli {
    /// Log format: `text` (for people; colours only on a terminal) or `json` (one object per
    /// line, for log pipelines).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "SLUICE_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway. With no flags: 127.0.0.1:8750, data in ./sluice-data, model `sim`.
    Serve {
        /// Address to listen on [default: 127.0.0.1:8750]
        #[arg(long, env = "SLUICE_LISTEN")]
        listen: Option<SocketAddr>,
        /// Directory for the SQLite database [default: ./sluice-data]
        #[arg(long, env = "SLUICE_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// TOML config file (models, timeouts, limits); see docs/config.md
        #[arg(long, env = "SLUICE_CONFIG")]
        config: Option<PathBuf>,
        /// PostgreSQL store instead of SQLite: postgres://user@host:port/db (see docs/scale-out.md)
        #[arg(long, env = "SLUICE_STORE_URL", hide_env_values = true)]
        store_url: Option<String>,
    },
    /// Apply the PostgreSQL store's migrations and exit (`serve` also applies them at start).
    Migrate {
        /// The PostgreSQL store: postgres://user@host:port/db
        #[arg(long, env = "SLUICE_STORE_URL", hide_env_values = true)]
        store_url: Option<String>,
        /// TOML config file whose `[store] url` to use
        #[arg(long, env = "SLUICE_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Serve the simulated model over HTTP as an OpenAI-compatible upstream (for tests and
    /// benchmarks). GET /stats reports request counters.
    MockUpstream {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: SocketAddr,
        /// Default tokens per answer.
        #[arg(long, default_value_t = SimDefaults::default().tokens)]
        tokens: u32,
        /// Default delay before the first token, ms.
        #[arg(long, default_value_t = SimDefaults::default().first_token_ms)]
        first_token_ms: u64,
        /// Default delay between tokens, ms.
        #[arg(long, default_value_t = SimDefaults::default().token_interval_ms)]
        token_interval_ms: u64,
        /// Write each event in pieces of this many bytes (0: whole).
        #[arg(long, default_value_t = 0)]
        split_bytes: usize,
    },
    /// Stream an answer to the terminal. Ctrl-C cancels it.
    Chat {
        #[command(flatten)]
        target: TargetArgs,
        /// The model to ask.
        #[arg(long, default_value = "sim")]
        model: String,
        /// The prompt.
        prompt: String,
    },
    /// Manage API keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// List and show recorded streams.
    Streams {
        #[command(subcommand)]
        command: StreamsCommand,
    },
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Print a fresh API key and the config lines that accept it (the config holds only its
    /// SHA-256).
    New {
        /// The tenant the key's streams belong to.
        #[arg(long)]
        tenant: String,
    },
}

#[derive(Debug, Subcommand)]
enum StreamsCommand {
    /// The newest streams.
    Ls {
        #[command(flatten)]
        target: TargetArgs,
        /// How many.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// One stream's transcript.
    Show {
        #[command(flatten)]
        target: TargetArgs,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
        /// The stream id.
        id: String,
    },
    /// Follow a stream (or replay a finished one) to its end, resuming by itself when the
    /// connection drops.
    Tail {
        #[command(flatten)]
        target: TargetArgs,
        /// The stream id.
        id: String,
    },
    /// Stop a running stream (cancelled(requested)); prints its final status.
    Cancel {
        #[command(flatten)]
        target: TargetArgs,
        /// The stream id.
        id: String,
    },
}

/// Where the gateway is and how to authenticate.
#[derive(Debug, clap::Args)]
struct TargetArgs {
    /// sluice's URL.
    #[arg(long, env = "SLUICE_URL", default_value = "http://127.0.0.1:8750")]
    url: String,
    /// API key (when the gateway has [[keys]]).
    #[arg(long, env = "SLUICE_KEY", hide_env_values = true)]
    key: Option<String>,
}

impl TargetArgs {
    fn target(self) -> client::Target {
        client::Target {
            url: self.url,
            key: self.key,
        }
    }
}

/// Says how a chat ended (on stderr) and turns it into the process's exit code.
fn exit_with(outcome: client::ChatOutcome) -> ExitCode {
    match &outcome {
        client::ChatOutcome::Completed => {}
        client::ChatOutcome::Failed(reason) => eprintln!("error: {reason:#}"),
        client::ChatOutcome::Interrupted => eprintln!("cancelled"),
    }
    ExitCode::from(u8::try_from(outcome.exit_code()).unwrap_or(1))
}

/// Resolves on Ctrl-C or SIGTERM.
async fn stop_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

fn init_tracing(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("Error: {e:?}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Migrate { store_url, config } => {
            init_tracing(cli.log_format);
            let overrides = Overrides {
                store_url,
                ..Overrides::default()
            };
            let config = Config::load(config.as_deref(), &overrides)?;
            let url = config.store_url.as_deref().context(
                "no PostgreSQL store to migrate: give --store-url, SLUICE_STORE_URL or [store] url",
            )?;
            let applied = sluice::store::Store::migrate(url).await?;
            eprintln!("the store's schema is up to date ({applied} migrations applied)");
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve {
            listen,
            data_dir,
            config,
            store_url,
        } => {
            init_tracing(cli.log_format);
            return_freed_memory();
            let overrides = Overrides {
                listen,
                data_dir,
                store_url,
                env: None,
            };
            let config = Config::load(config.as_deref(), &overrides)?;
            let server = Server::bind(config).await?;
            let report = server.serve_until(stop_signal()).await?;
            if let sluice_flow::Drained::TimedOut { still_running } = report.drained {
                anyhow::bail!("{still_running} tasks were still running at exit");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::MockUpstream {
            listen,
            tokens,
            first_token_ms,
            token_interval_ms,
            split_bytes,
        } => {
            init_tracing(cli.log_format);
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            let defaults = SimDefaults {
                tokens,
                first_token_ms,
                token_interval_ms,
                ..SimDefaults::default()
            };
            let mock = MockUpstream::start(
                listener,
                MockOptions {
                    defaults,
                    split_bytes,
                    ..MockOptions::default()
                },
            )?;
            eprintln!("mock upstream at {}", mock.base_url());
            tokio::select! {
                () = mock.wait() => {},
                () = stop_signal() => {},
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Chat {
            target,
            model,
            prompt,
        } => {
            let mut stdout = std::io::stdout();
            let outcome = client::chat(&target.target(), &model, &prompt, &mut stdout, async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await;
            Ok(exit_with(outcome))
        }
        Command::Keys {
            command: KeysCommand::New { tenant },
        } => {
            let key = sluice::auth::new_key().map_err(anyhow::Error::msg)?;
            println!(
                "key: {key}\n\nAdd to the config file:\n\n{}",
                sluice::auth::config_lines(&tenant, &key)
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Streams { command } => {
            let out = match command {
                StreamsCommand::Ls { target, limit } => {
                    client::streams_ls(&target.target(), limit).await
                }
                StreamsCommand::Show { target, json, id } => {
                    client::streams_show(&target.target(), &id, json).await
                }
                StreamsCommand::Cancel { target, id } => {
                    client::streams_cancel(&target.target(), &id).await
                }
                StreamsCommand::Tail { target, id } => {
                    let target = target.target();
                    let mut stdout = std::io::stdout();
                    let outcome = tokio::select! {
                        outcome = client::streams_tail(&target, &id, &mut stdout) => outcome,
                        _ = tokio::signal::ctrl_c() => client::ChatOutcome::Interrupted,
                    };
                    return Ok(exit_with(outcome));
                }
            };
            print!("{}", out?);
            Ok(ExitCode::SUCCESS)
        }
    }
}
