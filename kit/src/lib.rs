//! What every smartdb service shares: server bootstrap (health, reflection, graceful shutdown,
//! metrics endpoint), client channels to other services, call context propagation, telemetry
//! setup and config helpers.

pub mod admission;
pub mod bearer;
pub mod client;
pub mod config;
pub mod context;
pub mod cork;
pub mod ids;
pub mod limits;
pub mod listeners;
pub mod memory;
pub mod metrics;
#[cfg(feature = "mongodb")]
pub mod mongo;
pub mod redis;
pub mod server;
pub mod shutdown;
mod spans;
pub mod status;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;
pub mod tls;

/// Version of smartdb, reported by health and status endpoints.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
