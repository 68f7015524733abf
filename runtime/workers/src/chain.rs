//! The per-tenant hash chain: each accepted event's link commits to the previous link and the
//! event's sha256, so removing, reordering or altering any accepted event breaks every later link.

use sha2::{Digest, Sha256};
use sqlx::PgPool;

/// Domain separation for chain links.
const CHAIN_DOMAIN: &[u8] = b"spendguard.chain.v1\0";

/// The link before a tenant's first event.
pub const GENESIS: [u8; 32] = [0; 32];

/// `sha256("spendguard.chain.v1\0" || prev || event_sha256)`.
pub fn link(prev: &[u8; 32], event_sha256: &[u8; 32]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(CHAIN_DOMAIN);
    hasher.update(prev);
    hasher.update(event_sha256);
    hasher.finalize().into()
}

/// Why a stored chain does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// A chain sequence is missing or repeated.
    #[error("chain of {tenant_id} is not contiguous at {chain_seq}")]
    Gap {
        /// Tenant.
        tenant_id: String,
        /// First bad position.
        chain_seq: i64,
    },
    /// A stored hash does not match its recomputation.
    #[error("chain of {tenant_id} is broken at {chain_seq}: {what}")]
    Broken {
        /// Tenant.
        tenant_id: String,
        /// First bad position.
        chain_seq: i64,
        /// Which hash.
        what: &'static str,
    },
    /// The head does not name the last link.
    #[error("chain head of {0} does not match its last link")]
    Head(String),
    /// Reading failed.
    #[error("database: {0}")]
    Database(String),
}

impl From<sqlx::Error> for ChainError {
    fn from(e: sqlx::Error) -> Self {
        Self::Database(e.to_string())
    }
}

fn hash32(bytes: &[u8]) -> Option<[u8; 32]> {
    bytes.try_into().ok()
}

/// Recomputes a tenant's chain from its stored events; returns its length.
///
/// # Errors
/// The first [`ChainError`] found.
pub async fn verify_chain(pool: &PgPool, tenant_id: &str) -> Result<i64, ChainError> {
    type Row = (i64, Vec<u8>, Vec<u8>, Vec<u8>, Vec<u8>);
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT chain_seq, canonical_event, event_sha256, prev_chain_hash, chain_hash
           FROM audit_chain WHERE tenant_id = $1 ORDER BY chain_seq",
    )
    .bind(tenant_id)
    .fetch_all(pool)
    .await?;
    let broken = |chain_seq, what| ChainError::Broken {
        tenant_id: tenant_id.to_owned(),
        chain_seq,
        what,
    };
    let mut prev = GENESIS;
    let mut expected_seq = 1;
    for (chain_seq, bytes, event_sha256, prev_hash, chain_hash) in rows {
        if chain_seq != expected_seq {
            return Err(ChainError::Gap {
                tenant_id: tenant_id.to_owned(),
                chain_seq: expected_seq,
            });
        }
        let digest: [u8; 32] = Sha256::digest(&bytes).into();
        if hash32(&event_sha256) != Some(digest) {
            return Err(broken(chain_seq, "event_sha256"));
        }
        if hash32(&prev_hash) != Some(prev) {
            return Err(broken(chain_seq, "prev_chain_hash"));
        }
        let next = link(&prev, &digest);
        if hash32(&chain_hash) != Some(next) {
            return Err(broken(chain_seq, "chain_hash"));
        }
        prev = next;
        expected_seq += 1;
    }
    let head: Option<(i64, Vec<u8>)> =
        sqlx::query_as("SELECT chain_seq, chain_hash FROM audit_chain_heads WHERE tenant_id = $1")
            .bind(tenant_id)
            .fetch_optional(pool)
            .await?;
    let length = expected_seq - 1;
    match head {
        None if length == 0 => Ok(0),
        Some((seq, hash)) if seq == length && hash32(&hash) == Some(prev) => Ok(length),
        _ => Err(ChainError::Head(tenant_id.to_owned())),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn links_depend_on_order_and_content() {
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let ab = link(&link(&GENESIS, &a), &b);
        let ba = link(&link(&GENESIS, &b), &a);
        assert_ne!(ab, ba);
        assert_ne!(link(&GENESIS, &a), link(&GENESIS, &b));
        assert_eq!(link(&GENESIS, &a), link(&GENESIS, &a));
    }
}
