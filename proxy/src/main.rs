//! `dbproxy`: the daemon's command line.

use clap::{Parser, Subcommand};
use proxy::config::Config;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "dbproxy",
    version,
    about = "MySQL/MariaDB and PostgreSQL connection proxy with a warm backend pool"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum GuardAction {
    Status {
        #[arg(long, short)]
        config: PathBuf,
    },
    Detach {
        #[arg(long, short)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy until SIGINT or SIGTERM.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a configuration file; each error names its key.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// The kernel guard: `status` shows what is attached and protected, `detach` removes
    /// pinned links and maps.
    Guard {
        #[command(subcommand)]
        action: GuardAction,
    },
    /// Read a password from standard input (one line) and print the `password_hash` value
    /// of a `[[users]]` entry for it.
    HashPassword,
    /// The null relay, for benchmarks: dbproxy's event loop forwarding bytes between each
    /// client and a connection to `--target`, with no protocol work (no login, no pool).
    Relay {
        #[arg(long)]
        listen: std::net::SocketAddr,
        #[arg(long)]
        target: std::net::SocketAddr,
        /// Worker threads; 0 = one per core.
        #[arg(long, default_value_t = 0)]
        workers: usize,
        /// `uring` or `epoll`.
        #[arg(long, default_value = "uring")]
        io: String,
    },
    /// Print an IAM login token for `--user` (the analogue of `aws rds
    /// generate-db-auth-token`): an STS GetCallerIdentity request presigned with the
    /// caller's AWS credentials (environment, shared config, instance profile). Log in with
    /// it as the password, over TLS, with mysql_clear_password (`mariadb --ssl
    /// --enable-cleartext-plugin`).
    Token {
        /// The dbproxy user the token is for.
        #[arg(long)]
        user: String,
        /// Take `[aws_iam]` (sts_endpoint, region, server_id) from this configuration.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// The STS endpoint the token is signed for (overrides the configuration's).
        #[arg(long)]
        sts_endpoint: Option<String>,
        #[arg(long)]
        region: Option<String>,
        /// The token's validity in seconds (at most 900).
        #[arg(long, default_value_t = 900)]
        expires_in: u64,
    },
    /// Print a running dbproxy's status as tables: endpoints, targets, pools, pins,
    /// recent failovers, the guard.
    Status {
        /// The `[admin] listen` address of the running dbproxy.
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin: String,
        /// Print `/status` as JSON instead.
        #[arg(long, conflicts_with = "metrics")]
        json: bool,
        /// Print `/metrics` instead.
        #[arg(long)]
        metrics: bool,
        /// The admin user, when the admin side asks for a login (`http_auth = "basic"`);
        /// its password comes from the environment variable DBPROXY_ADMIN_PASSWORD.
        #[arg(long)]
        user: Option<String>,
    },
}

/// Crates whose logs never go below warnings.
const QUIET_CRATES: &str = "aws_config=error,aws_runtime=warn,aws_credential_types=warn,\
    aws_smithy_types=warn,aws_smithy_runtime=warn,aws_smithy_runtime_api=warn,\
    aws_smithy_http_client=warn,aws_sigv4=warn,aws_sdk_secretsmanager=warn,aws_sdk_sts=warn,aws_sdk_sso=warn,\
    aws_sdk_ssooidc=warn,hyper=warn,\
    hyper_util=warn,reqwest=warn,h2=warn,rustls=warn";

/// The log filter for `directives` (DBPROXY_LOG's syntax). Levels per target, the usual
/// case, are a static filter; only directives on spans or fields need `EnvFilter`, which
/// takes a lock shared by every core each time a client's span is entered or left (at
/// every poll of its session).
fn log_filter(
    directives: &str,
) -> Box<dyn tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync> {
    use tracing_subscriber::filter::{EnvFilter, Targets};
    if let Ok(t) = directives.parse::<Targets>() {
        return Box::new(t);
    }
    match EnvFilter::try_new(directives) {
        Ok(f) => Box::new(f),
        Err(_) => Box::new(EnvFilter::new(format!("info,{QUIET_CRATES}"))),
    }
}

fn main() -> ExitCode {
    // The HTTP and AWS crates stay at warnings whatever DBPROXY_LOG says: their debug and
    // trace output may carry request and response bodies (secrets, tokens).
    let filter = format!(
        "{},{QUIET_CRATES}",
        std::env::var("DBPROXY_LOG").unwrap_or_else(|_| "info".into())
    );
    let filter = log_filter(&filter);
    let cli = Cli::parse();
    // `run` logs as its configuration says (a file that does not load is reported below).
    let json = match &cli.command {
        Command::Run { config } => {
            Config::load(config).is_ok_and(|c| c.proxy.log_format == proxy::config::LogFormat::Json)
        }
        _ => false,
    };
    {
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
        let registry = tracing_subscriber::registry().with(filter);
        if json {
            registry
                .with(fmt.json().with_current_span(true).with_span_list(false))
                .init();
        } else {
            registry
                .with(fmt.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())))
                .init();
        }
    }
    match cli.command {
        Command::Relay {
            listen,
            target,
            workers,
            io,
        } => {
            let workers = match workers {
                0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
                n => n,
            };
            match proxy::relay::run(listen, target, workers, io == "epoll") {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("relay: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::HashPassword => {
            let mut line = String::new();
            if let Err(e) = std::io::stdin().read_line(&mut line) {
                eprintln!("cannot read the password from standard input: {e}");
                return ExitCode::FAILURE;
            }
            let password = line.strip_suffix('\n').unwrap_or(&line);
            let password = password.strip_suffix('\r').unwrap_or(password);
            println!(
                "{}",
                proxy::mysql::auth::PasswordHash::of(password.as_bytes()).encode()
            );
            ExitCode::SUCCESS
        }
        Command::Token {
            user,
            config,
            sts_endpoint,
            region,
            expires_in,
        } => {
            let mut iam = match config.as_deref().map(Config::load) {
                Some(Ok(c)) => c.aws_iam.unwrap_or_default(),
                Some(Err(e)) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
                None => Default::default(),
            };
            if let Some(e) = sts_endpoint {
                iam.sts_endpoint = e;
            }
            if let Some(r) = region {
                iam.region = r;
            }
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("cannot start a runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let expires = Duration::from_secs(expires_in.min(proxy::auth::iam::MAX_AGE));
            match rt.block_on(proxy::auth::iam::make_token(&iam, &user, expires)) {
                Ok(t) => {
                    println!("{t}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::CheckConfig { config } => match Config::load(&config) {
            Ok(mut cfg) => {
                let mut errs = match proxy::secrets::SecretStore::open(&mut cfg) {
                    // The JWKS is read as at start.
                    Ok(store) => proxy::auth::tokens::TokenVerifier::start(&cfg, store.handle())
                        .err()
                        .into_iter()
                        .collect(),
                    Err(errs) => errs,
                };
                errs.extend(proxy::tls::check_files(&cfg));
                if cfg.guard.enabled && !proxy::guard::built_in() {
                    errs.push("guard.enabled: this dbproxy was built without the guard's eBPF object (build it with `cargo xtask build`)".into());
                }
                if !errs.is_empty() {
                    eprintln!("{}", errs.join("\n"));
                    return ExitCode::FAILURE;
                }
                for w in cfg.warnings() {
                    eprintln!("warning: {w}");
                }
                println!("{}: ok", config.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Command::Guard { action } => {
            let (config, detach) = match action {
                GuardAction::Status { config } => (config, false),
                GuardAction::Detach { config } => (config, true),
            };
            let cfg = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            let r = if detach {
                proxy::guard::detach(&cfg.guard)
            } else {
                proxy::guard::status(&cfg.guard)
            };
            match r {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Status {
            admin,
            json,
            metrics,
            user,
        } => {
            let path = if metrics { "/metrics" } else { "/status" };
            let password = std::env::var("DBPROXY_ADMIN_PASSWORD").unwrap_or_default();
            let login = user.as_deref().map(|u| (u, password.as_str()));
            let text = match proxy::admin::fetch(&admin, path, login) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("cannot read {admin}: {e}");
                    return ExitCode::FAILURE;
                }
            };
            if json || metrics {
                print!("{text}");
                return ExitCode::SUCCESS;
            }
            match serde_json::from_str::<proxy::admin::status::Status>(&text) {
                Ok(s) => {
                    print!("{}", proxy::admin::status::render_tables(&s));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{admin} answered something that is not dbproxy's status: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run { config } => {
            let mut cfg = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            let secrets = match proxy::secrets::SecretStore::open(&mut cfg) {
                Ok(s) => s,
                Err(errs) => {
                    eprintln!("{}", errs.join("\n"));
                    return ExitCode::FAILURE;
                }
            };
            for w in cfg.warnings() {
                tracing::warn!("{w}");
            }
            let running = match proxy::runtime::start(cfg, Some(secrets)) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            running.shared.set_config_path(&config);
            match wait_for_signal(&running.shared) {
                Stop::Drain => {
                    // As configured now (a reload may have changed it).
                    let timeout = running.shared.config().proxy.shutdown_timeout;
                    running.drain(timeout)
                }
                Stop::Now => {
                    tracing::info!("shutting down");
                    running.stop(Duration::from_secs(2));
                }
            }
            ExitCode::SUCCESS
        }
    }
}

/// How to stop.
enum Stop {
    /// SIGTERM: drain (see `Running::drain`).
    Drain,
    /// SIGINT: stop at once.
    Now,
}

/// Waits for SIGTERM (drain) or SIGINT (stop now); SIGHUP reloads the configuration
/// meanwhile (see `ProxyShared::reload`).
fn wait_for_signal(shared: &std::sync::Arc<proxy::shared::ProxyShared>) -> Stop {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot wait for signals: {e}");
            loop {
                std::thread::park();
            }
        }
    };
    rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) {
            (Ok(mut term), Ok(mut int), Ok(mut hup)) => loop {
                tokio::select! {
                    _ = term.recv() => break Stop::Drain,
                    _ = int.recv() => break Stop::Now,
                    _ = hup.recv() => {
                        // Off this runtime: a reload may block on reading secrets.
                        let sh = shared.clone();
                        let done = tokio::task::spawn_blocking(move || sh.reload()).await;
                        match done {
                            Ok(Ok(_)) => {}
                            Ok(Err(e)) => tracing::error!("SIGHUP: configuration not reloaded, the running one stays: {e}"),
                            Err(e) => tracing::error!("SIGHUP: the reload stopped: {e}"),
                        }
                    }
                }
            },
            _ => {
                let _ = tokio::signal::ctrl_c().await;
                Stop::Now
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;
    use tracing_subscriber::filter::{EnvFilter, Targets};

    #[test]
    fn levels_per_target_get_the_static_filter_and_span_directives_do_not() {
        let t: Targets = format!("info,proxy::conn=debug,{QUIET_CRATES}")
            .parse()
            .expect("levels per target parse as Targets");
        assert!(t.would_enable("proxy::conn", &Level::DEBUG));
        assert!(!t.would_enable("proxy::pool", &Level::DEBUG));
        assert!(!t.would_enable("hyper::proto", &Level::INFO));
        assert!(t.would_enable("hyper::proto", &Level::WARN));
        // Directives on spans or fields are EnvFilter's alone.
        assert!("proxy[client{user=app}]=debug".parse::<Targets>().is_err());
        assert!(EnvFilter::try_new("proxy[client{user=app}]=debug").is_ok());
    }
}
