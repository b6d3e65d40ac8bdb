//! The `mqproxy` command.

use anyhow::Context;
use clap::{Parser, Subcommand};
use mqproxy::config::Config;
use std::io::Write;
use std::path::PathBuf;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "mqproxy",
    version,
    about = "Produce and consume RocketMQ-style messages over plain HTTP (MQCloud HTTP proxy API)"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// `mqproxy [OPTIONS]` is `mqproxy serve [OPTIONS]`.
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the server (the default when no command is given).
    Serve(ServeArgs),
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// TOML config file (topics, producers, consumers, storage). Without it the server runs the
    /// demo registry: topic mqcloud-http-test-topic (4 queues), producer
    /// mqcloud-http-test-topic-producer, consumers http-clustering-consumer and
    /// http-broadcast-consumer.
    #[arg(long, short, env = "MQPROXY_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on, overriding the config's `listen` (default 127.0.0.1:8080; port 0
    /// picks a free port, printed at start).
    #[arg(long, env = "MQPROXY_LISTEN")]
    listen: Option<String>,
    /// Address of the admin listener (admin API and console for loopback clients without a
    /// token), overriding the config's `admin_listen`; `off` turns it off. Default: 127.0.0.1
    /// on the port after the listen port's.
    #[arg(long, env = "MQPROXY_ADMIN_LISTEN")]
    admin_listen: Option<String>,
    /// Directory of the message store, overriding the config's `data_dir` (default ./data).
    #[arg(long, env = "MQPROXY_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Log format on stderr: `text` (default) or `json` (one JSON object per line, for log
    /// collectors).
    #[arg(long, env = "MQPROXY_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum LogFormat {
    Text,
    Json,
}

/// SIGTERM or SIGINT. The handlers are installed by `install`, before the "listening" line, so
/// a signal sent as soon as that line appears already means "shut down gracefully".
#[cfg(unix)]
fn install_shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => tracing::info!("SIGINT received"),
            _ = term.recv() => tracing::info!("SIGTERM received"),
        }
    })
}

#[cfg(not(unix))]
fn install_shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    Ok(async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
        tracing::info!("Ctrl-C received");
    })
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::demo(),
    };
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(admin) = args.admin_listen {
        config.admin_listen = Some(admin);
    }
    if let Some(dir) = args.data_dir {
        config.data_dir = dir;
    }
    let origin = args
        .config
        .as_ref()
        .map_or("(flags)".to_owned(), |p| p.display().to_string());
    config.validate(&origin)?;
    for note in config.moved_key_notes() {
        tracing::warn!(file = %origin, "{note}");
    }
    let listeners = mqproxy::server::Listeners::bind(&config).await?;
    let addr = listeners.public.local_addr()?;
    tracing::info!(
        %addr,
        data_dir = %config.data_dir.display(),
        topics = config.topics.len(),
        producers = config.producers.len(),
        consumers = config.consumers.len(),
        "mqproxy starting"
    );
    let shutdown = install_shutdown_signal()?;
    // The one line scripts and tests wait for.
    println!("{}", listeners.listening_line()?);
    std::io::stdout().flush()?;
    mqproxy::server::run(config, listeners, shutdown).await?;
    Ok(())
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The error chain in one line, no backtrace: config errors are for people.
            eprintln!("mqproxy: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let args = match cli.command {
        Some(Command::Serve(args)) => args,
        None => cli.serve,
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        "info,tower_http=warn,rocketmq_client_rust=warn,rocketmq_runtime=warn,rocketmq_transport=warn".into()
    });
    // Colour only for a person at a terminal: a log redirected to a file or collected by a
    // service manager gets plain text (and NO_COLOR is honoured).
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(serve(args))
}
