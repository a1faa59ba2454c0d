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
}

impl ServerArgs {
    /// Arguments for an in-process server on `listen` with no HTTP endpoint (tests, embedding).
    pub fn on(listen: SocketAddr) -> Self {
        Self {
            listen,
            http_listen: None,
            log_json: false,
            drain_timeout: Duration::from_secs(5),
            limits: crate::limits::Limits::default(),
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
}
