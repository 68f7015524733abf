//! Test harnesses over real parts (PostgreSQL, the control plane, moto for the AWS APIs). Nothing here fakes the ledger: tests that talk to it run the
//! real ledger on a real, throwaway PostgreSQL cluster.

pub mod control_plane;
pub mod invariants;
pub mod ledger;
pub mod moto;
pub mod paths;
mod ports;
pub mod postgres;
pub mod postgres_tls;
mod process;
pub mod signing;

pub use ledger::TestLedger;
pub use ports::free_port;
pub use postgres::PgCluster;
