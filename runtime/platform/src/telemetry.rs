//! Logging setup and the flags every binary shares.

use clap::{Args, ValueEnum};
use std::net::SocketAddr;
use tracing_subscriber::EnvFilter;

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable.
    Plain,
    /// One JSON object per line.
    Json,
}

/// Flags shared by every long-running binary.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// Log format.
    #[arg(
        long,
        env = "SPENDGUARD_LOG_FORMAT",
        value_enum,
        default_value = "plain"
    )]
    pub log_format: LogFormat,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "SPENDGUARD_LOG", default_value = "info")]
    pub log_filter: String,
    /// Address of the admin server (/healthz, /readyz, /metrics).
    #[arg(long, env = "SPENDGUARD_ADMIN_ADDR", default_value = "127.0.0.1:9464")]
    pub admin_addr: SocketAddr,
}

/// Why logging could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The filter did not parse.
    #[error("invalid log filter: {0}")]
    Filter(String),
    /// A global subscriber was already set.
    #[error("logging already initialised")]
    AlreadySet,
}

impl CommonArgs {
    /// Installs the global tracing subscriber.
    ///
    /// # Errors
    /// [`TelemetryError`] when the filter is invalid or logging was already set up.
    pub fn init_tracing(&self) -> Result<(), TelemetryError> {
        let filter = EnvFilter::try_new(&self.log_filter)
            .map_err(|e| TelemetryError::Filter(e.to_string()))?;
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr);
        let result = match self.log_format {
            LogFormat::Plain => builder.try_init(),
            LogFormat::Json => builder.json().try_init(),
        };
        result.map_err(|_| TelemetryError::AlreadySet)
    }
}
