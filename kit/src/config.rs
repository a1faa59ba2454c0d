//! Configuration shared by every service. Each flag can also be set through a `SMARTDB_*`
//! environment variable; flags win.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Listen addresses and logging, common to all services.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerArgs {
    /// Address the gRPC server listens on.
    #[arg(long, env = "SMARTDB_LISTEN")]
    pub listen: SocketAddr,
    /// Address of the HTTP endpoint serving Prometheus `/metrics` (and service-specific HTTP
    /// APIs); unset disables it.
    #[arg(long, env = "SMARTDB_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "SMARTDB_LOG_JSON", default_value_t = false)]
    pub log_json: bool,
    /// How long in-flight calls may take to finish after a shutdown signal.
    #[arg(long, env = "SMARTDB_DRAIN_TIMEOUT", default_value = "20s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// Limits on calls, sizes and deadlines.
    #[command(flatten)]
    pub limits: crate::limits::Limits,
    /// How this service calls the others.
    #[command(flatten)]
    pub client: ClientArgs,
    /// TLS as a server and as a client of the others.
    #[command(flatten)]
    pub tls: crate::tls::TlsArgs,
}

/// How a service calls other smartdb services (see `kit::client`).
#[derive(Debug, Clone, clap::Args)]
pub struct ClientArgs {
    /// Longest one attempt of a call to another service may take; a retry may follow while the
    /// call's deadline allows.
    #[arg(long = "client-attempt-timeout", env = "SMARTDB_CLIENT_ATTEMPT_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub attempt_timeout: Duration,
    /// Retries of a failed idempotent call to another service (only failures that may pass:
    /// unavailable, or overloaded with a retry hint).
    #[arg(
        long = "client-retries",
        env = "SMARTDB_CLIENT_RETRIES",
        default_value_t = 2
    )]
    pub retries: u32,
    /// Share of recent calls that may be retries (the retry budget), so that retries never
    /// multiply the load on a struggling service.
    #[arg(
        long = "client-retry-budget",
        env = "SMARTDB_CLIENT_RETRY_BUDGET",
        default_value_t = 0.2
    )]
    pub retry_budget: f32,
    /// Connection failures or unanswered attempts in a row that open an endpoint's circuit
    /// breaker (calls then fail fast, or go to other replicas).
    #[arg(
        long = "client-breaker-failures",
        env = "SMARTDB_CLIENT_BREAKER_FAILURES",
        default_value_t = 5
    )]
    pub breaker_failures: u32,
    /// How long an endpoint's breaker first stays open before a trial call (doubling, up to
    /// 5 s or this if longer, while trials fail).
    #[arg(long = "client-breaker-open", env = "SMARTDB_CLIENT_BREAKER_OPEN", default_value = "1s", value_parser = parse_duration)]
    pub breaker_open: Duration,
    /// Calls in flight to one endpoint of another service; beyond it, calls are shed at once.
    #[arg(
        id = "client_max_in_flight",
        value_name = "N",
        long = "client-max-in-flight",
        env = "SMARTDB_CLIENT_MAX_IN_FLIGHT",
        default_value_t = 256
    )]
    pub max_in_flight: usize,
    /// How often DNS names of other services are resolved again (to follow their replicas).
    #[arg(long = "client-dns-refresh", env = "SMARTDB_CLIENT_DNS_REFRESH", default_value = "5s", value_parser = parse_duration)]
    pub dns_refresh: Duration,
}

impl Default for ClientArgs {
    fn default() -> Self {
        #[derive(clap::Parser)]
        struct Defaults {
            #[command(flatten)]
            client: ClientArgs,
        }
        <Defaults as clap::Parser>::parse_from(["client"]).client
    }
}

impl ClientArgs {
    /// Client settings from these flags and the `limits` (message sizes, default deadline).
    pub fn settings(&self, limits: &crate::limits::Limits) -> crate::client::ClientSettings {
        let defaults = crate::client::ClientSettings::default();
        crate::client::ClientSettings {
            attempt_timeout: self.attempt_timeout,
            max_in_flight_per_endpoint: self.max_in_flight.max(1),
            retry: crate::client::RetrySettings {
                max_retries: self.retries,
                budget_percent: self.retry_budget,
                ..defaults.retry
            },
            breaker: crate::client::BreakerSettings {
                consecutive_failures: self.breaker_failures.max(1),
                open: self.breaker_open,
                ..defaults.breaker
            },
            refresh: self.dns_refresh,
            max_message_bytes: limits.message_bytes(),
            default_timeout: limits.default_deadline,
            ..defaults
        }
    }
}

impl ServerArgs {
    /// Settings of this service's clients of other services.
    pub fn client_settings(&self) -> anyhow::Result<crate::client::ClientSettings> {
        Ok(crate::client::ClientSettings {
            tls: self.tls.client()?,
            ..self.client.settings(&self.limits)
        })
    }

    /// Arguments for an in-process server on `listen` with no HTTP endpoint (tests, embedding).
    pub fn on(listen: SocketAddr) -> Self {
        Self {
            listen,
            http_listen: None,
            log_json: false,
            drain_timeout: Duration::from_secs(5),
            limits: crate::limits::Limits::default(),
            client: ClientArgs::default(),
            tls: crate::tls::TlsArgs::default(),
        }
    }
}

/// Default directory for service data: `SMARTDB_DATA_DIR`, else `$XDG_DATA_HOME/smartdb`,
/// else `~/.local/share/smartdb`, else `./smartdb-data`.
pub fn default_data_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SMARTDB_DATA_DIR") {
        return dir.into();
    }
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(dir).join("smartdb");
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".local/share/smartdb"),
        None => PathBuf::from("smartdb-data"),
    }
}

/// A service's data directory: `explicit` if given, else `<default data dir>/<service>`;
/// created if missing.
pub fn service_data_dir(explicit: Option<&PathBuf>, service: &str) -> anyhow::Result<PathBuf> {
    let dir = explicit
        .cloned()
        .unwrap_or_else(|| default_data_dir().join(service));
    std::fs::create_dir_all(&dir)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
    Ok(dir)
}

/// Parses durations like `250ms`, `5s`, `2m`, `1h` (a bare number means seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("invalid duration {text:?}"))?;
    let secs = match unit {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => {
            return Err(format!(
                "invalid duration unit in {text:?} (use ms, s, m or h)"
            ));
        }
    };
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("5 parsecs").is_err());
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        server: ServerArgs,
    }

    #[test]
    fn server_args_parse_and_have_distinct_ids() {
        use clap::{CommandFactory, Parser};
        // Catches two flattened groups declaring the same argument id (clap refuses at run time).
        Cli::command().debug_assert();
        let args = [
            "svc",
            "--listen",
            "127.0.0.1:1",
            "--client-max-in-flight",
            "7",
            "--max-in-flight",
            "9",
        ];
        let cli = Cli::try_parse_from(args).unwrap();
        assert_eq!(cli.server.client.max_in_flight, 7);
        assert_eq!(cli.server.limits.max_in_flight, 9);
    }
}
