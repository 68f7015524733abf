//! Test harnesses over real parts (PostgreSQL, the control plane, moto for the AWS APIs). Nothing here fakes the ledger: tests that talk to it run the
//! real ledger on a real, throwaway PostgreSQL cluster.

pub mod control_plane;
pub mod invariants;
pub mod ledger;
pub mod moto;
pub mod postgres;
pub mod postgres_tls;
mod process;
pub mod signing;

pub use ledger::TestLedger;
pub use postgres::PgCluster;

/// A free loopback TCP port (bound, then released).
///
/// # Panics
/// When no port can be bound (the test cannot run anyway).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind a free loopback port")
}
