//! The `covata-gateway` command: parses the command line, reads the configuration,
//! sets up logging and signals, and hands over to the library.

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use covata_gateway::{Config, Gateway};
use tokio::net::TcpListener;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "covata-gateway", version, about)]
struct Cli {
    /// The configuration file.
    #[arg(long, global = true, default_value = "config.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Read a password on stdin and print its argon2id PHC string for config.toml.
    HashPassword,
    /// Validate the configuration (and certificate) and exit 0, or 1 naming the problem.
    CheckConfig,
    /// Run a small upstream service to try the gateway with (JSON echo of what it receives).
    DemoUpstream {
        /// Address to listen on; repeat for several. Default: the shipped config's upstreams.
        #[arg(long)]
        listen: Vec<SocketAddr>,
        /// Answer every request with this many bytes instead of the JSON echo.
        #[arg(long)]
        body_size: Option<usize>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour only on a terminal: escape codes in a log file or journal are noise.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        Some(Command::HashPassword) => hash_password(),
        Some(Command::CheckConfig) => check_config(&cli.config),
        Some(Command::DemoUpstream { listen, body_size }) => demo_upstream(listen, body_size),
        None => run(&cli.config),
    }
}

fn hash_password() -> ExitCode {
    let mut input = String::new();
    if let Err(error) = std::io::stdin().read_to_string(&mut input) {
        eprintln!("error: cannot read the password from stdin: {error}");
        return ExitCode::FAILURE;
    }
    let password = input.strip_suffix('\n').unwrap_or(&input);
    let password = password.strip_suffix('\r').unwrap_or(password);
    if password.is_empty() {
        eprintln!("error: the password is empty");
        return ExitCode::FAILURE;
    }
    match covata_gateway::credentials::hash_password(password) {
        Ok(phc) => {
            println!("{phc}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: cannot hash the password: {error}");
            ExitCode::FAILURE
        }
    }
}

fn check_config(path: &Path) -> ExitCode {
    let checked = Config::load(path).and_then(|config| {
        for (shadowed, by) in covata_gateway::routes::shadowed(&config.routes) {
            println!(
                "warning: routes[{shadowed}] (path \"{}\") can never match: routes[{by}] (path \"{}\") comes first and takes every request it would",
                config.routes[shadowed].path.as_str(),
                config.routes[by].path.as_str()
            );
        }
        let cert = config.resolve(config.server.tls_cert.get_ref());
        let key = config.resolve(config.server.tls_key.get_ref());
        if !cert.exists() && !key.exists() {
            println!("note: no certificate yet; a development pair will be generated at start");
            return Ok(());
        }
        covata_gateway::gateway::Live::build(config, false).map(drop)
    });
    match checked {
        Ok(()) => {
            println!("{}: ok", path.display());
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

fn demo_upstream(listen: Vec<SocketAddr>, body_size: Option<usize>) -> ExitCode {
    let listen = if listen.is_empty() {
        vec![
            SocketAddr::from(([127, 0, 0, 1], 8081)),
            SocketAddr::from(([127, 0, 0, 1], 8082)),
        ]
    } else {
        listen
    };
    let result = runtime().map_err(|e| e.to_string()).and_then(|rt| {
        rt.block_on(async {
            let listeners = covata_gateway::demo::bind(&listen).await?;
            for address in &listen {
                tracing::info!(%address, "demo upstream listening");
            }
            covata_gateway::demo::serve(listeners, body_size).await;
            Ok(())
        })
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

fn run(path: &Path) -> ExitCode {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match runtime() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(path, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(path: &Path, config: Config) -> Result<(), String> {
    let (listen, admin_listen) = (config.server.listen, config.admin.listen);
    let redirect_listen = config.server.http_redirect_listen;
    let gateway = Gateway::new(config).map_err(|e| e.to_string())?;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen} (server.listen): {e}"))?;
    let admin = TcpListener::bind(admin_listen)
        .await
        .map_err(|e| format!("cannot listen on {admin_listen} (admin.listen): {e}"))?;
    let redirect = match redirect_listen {
        Some(address) => Some(TcpListener::bind(address).await.map_err(|e| {
            format!("cannot listen on {address} (server.http_redirect_listen): {e}")
        })?),
        None => None,
    };
    // Handlers first, then the "serving" line: a signal sent the moment a supervisor
    // sees that line must find them installed, not the default action (exit).
    let signals = Signals::install().map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let bound = |l: &TcpListener| l.local_addr().map_err(|e| e.to_string());
    tracing::info!(
        listen = %bound(&listener)?,
        admin = %bound(&admin)?,
        redirect = ?redirect.as_ref().map(bound).transpose()?,
        "covata-gateway serving"
    );
    let Signals { shutdown, hangup } = signals;
    tokio::spawn(reload_on_hangup(gateway.clone(), path.to_owned(), hangup));
    let listeners = covata_gateway::server::Listeners {
        tls: listener,
        admin: Some(admin),
        redirect,
    };
    gateway.serve_all(listeners, shutdown).await;
    tracing::info!("stopped");
    Ok(())
}

/// The process's signal streams, installed before the gateway announces itself.
struct Signals {
    shutdown: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    #[cfg(unix)]
    hangup: tokio::signal::unix::Signal,
    #[cfg(not(unix))]
    hangup: (),
}

impl Signals {
    #[cfg(unix)]
    fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let hangup = signal(SignalKind::hangup())?;
        let shutdown = Box::pin(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::info!("shutdown signal received");
        });
        Ok(Signals { shutdown, hangup })
    }

    #[cfg(not(unix))]
    fn install() -> std::io::Result<Signals> {
        let shutdown = Box::pin(async {
            let _ = tokio::signal::ctrl_c().await;
        });
        Ok(Signals {
            shutdown,
            hangup: (),
        })
    }
}

/// SIGHUP: re-read the configuration and swap it in if it is valid.
#[cfg(unix)]
async fn reload_on_hangup(
    gateway: Gateway,
    path: PathBuf,
    mut hangup: tokio::signal::unix::Signal,
) {
    while hangup.recv().await.is_some() {
        match Config::load(&path).and_then(|config| gateway.reload(config)) {
            Ok(()) => tracing::info!(config = %path.display(), "configuration reloaded"),
            Err(error) => {
                tracing::error!(%error, "reload refused; the previous configuration stays in force")
            }
        }
    }
}

#[cfg(not(unix))]
async fn reload_on_hangup(_gateway: Gateway, _path: PathBuf, _hangup: ()) {}
