//! `spendguard audit publish-checkpoints`: copies each tenant's newest signed checkpoint out of the
//! database into a directory or S3 prefix, where an auditor can fetch it independently of any
//! export and hand it to `spendguard audit verify --checkpoint-note`.
//!
//! ```text
//! <location>/checkpoints/<tenant>/<tree size>.note   immutable: created once, never replaced
//! <location>/checkpoints/<tenant>/latest             the newest published note; only moves forward
//! ```
//!
//! (`/` and `:` in a tenant id are written as `%2F` and `%3A`, so one tenant is one path segment.)
//!
//! Before `latest` moves, the database must still hold the previously published root at the
//! previously published size (`EXPORT_CHECKPOINT_FORK` otherwise) and must not be behind it
//! (`EXPORT_CHECKPOINT_ROLLBACK`): a publication never silently follows a rewritten or restored
//! chain. This is a log of notes in storage the database cannot write, not a witness network:
//! nobody else cosigns, and whoever can write the bucket can still replace `latest` (see
//! docs/design/audit-export.md, "Published checkpoints").

use super::export::ExportError;
use super::sink::Sink;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use sqlx::PgPool;

/// Most tenants one run publishes; a bound on the tenant query, far above any installation's
/// tenant count. Name tenants with `--tenant` past it.
pub const TENANTS_MAX: i64 = 100_000;

/// What one tenant's publication did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// Tenant.
    pub tenant_id: String,
    /// Tree size of the newest checkpoint, now the published `latest`.
    pub tree_size: u64,
    /// False when `latest` already was this checkpoint.
    pub advanced: bool,
}

/// The object prefix of a tenant's published checkpoints.
pub fn tenant_prefix(tenant_id: &str) -> String {
    format!(
        "checkpoints/{}/",
        tenant_id.replace('/', "%2F").replace(':', "%3A")
    )
}

/// Origin, tree size and root of a note's body, unverified (the verifier checks the signature;
/// the publisher only needs to order notes and compare roots with its own database).
fn note_head(note: &[u8]) -> Option<(String, u64, [u8; 32])> {
    let text = std::str::from_utf8(note).ok()?;
    let mut lines = text.split('\n');
    let origin = lines.next()?.to_owned();
    let size = lines.next()?.parse().ok()?;
    let root = BASE64.decode(lines.next()?).ok()?.try_into().ok()?;
    Some((origin, size, root))
}

/// Publishes the newest checkpoint of each tenant in `tenants` (all tenants with a checkpoint
/// when empty) to `sink`.
///
/// # Errors
/// The first failure stops the run; tenants before it stay published. Notes are copied as
/// signed, never re-signed or judged. [`ExportError::CheckpointRollback`],
/// [`ExportError::CheckpointFork`], [`ExportError::PublishedCheckpointInvalid`] for an unreadable
/// `latest`, sink errors (`EXPORT_OBJECT_CONFLICT` for a `<size>.note` with other bytes) and
/// database errors.
///
/// # Guarantees
/// Reads only `audit_checkpoints` and `audit_chain`, scoped by tenant, through the caller's
/// (read-only) pool. `<size>.note` objects are never overwritten; `latest` never moves back.
pub async fn publish_checkpoints(
    pool: &PgPool,
    sink: &Sink,
    tenants: &[String],
) -> Result<Vec<Published>, ExportError> {
    let tenants: Vec<String> = if tenants.is_empty() {
        sqlx::query_scalar(
            "SELECT DISTINCT tenant_id FROM audit_checkpoints ORDER BY tenant_id LIMIT $1",
        )
        .bind(TENANTS_MAX)
        .fetch_all(pool)
        .await?
    } else {
        tenants.to_vec()
    };
    let mut published = Vec::with_capacity(tenants.len());
    for tenant_id in tenants {
        if let Some(done) = publish_tenant(pool, sink, &tenant_id).await? {
            published.push(done);
        }
    }
    Ok(published)
}

async fn publish_tenant(
    pool: &PgPool,
    sink: &Sink,
    tenant_id: &str,
) -> Result<Option<Published>, ExportError> {
    let newest: Option<(i64, String)> = sqlx::query_as(
        "SELECT tree_size, note FROM audit_checkpoints WHERE tenant_id = $1
          ORDER BY tree_size DESC LIMIT 1",
    )
    .bind(tenant_id)
    .fetch_optional(pool)
    .await?;
    let Some((size, note)) = newest else {
        return Ok(None);
    };
    let size = u64::try_from(size).expect("tree_size >= 1 is a table constraint");
    let prefix = tenant_prefix(tenant_id);
    let latest_name = format!("{prefix}latest");
    let unreadable = |reason: &'static str| ExportError::PublishedCheckpointInvalid {
        object: format!("{}/{latest_name}", sink.describe().trim_end_matches('/')),
        reason,
    };
    let previous = sink.read(&latest_name).await?;
    if let Some(previous) = &previous {
        let (origin, published, root) =
            note_head(previous).ok_or_else(|| unreadable("not a checkpoint note"))?;
        if origin != crate::checkpoint::origin(tenant_id) {
            return Err(unreadable("a checkpoint of another tenant"));
        }
        if published > size {
            return Err(ExportError::CheckpointRollback {
                tenant_id: tenant_id.to_owned(),
                published,
                newest: size,
            });
        }
        let stored: Option<Vec<u8>> = sqlx::query_scalar(
            "SELECT chain_hash FROM audit_chain WHERE tenant_id = $1 AND chain_seq = $2",
        )
        .bind(tenant_id)
        .bind(i64::try_from(published).unwrap_or(i64::MAX))
        .fetch_optional(pool)
        .await?;
        if stored.as_deref() != Some(root.as_slice()) {
            return Err(ExportError::CheckpointFork {
                tenant_id: tenant_id.to_owned(),
                tree_size: published,
            });
        }
    }
    // The immutable copy first, then `latest`: a crash in between leaves `latest` at the older
    // note, and the next run finds the new one already in place.
    sink.create(&format!("{prefix}{size}.note"), note.as_bytes())
        .await?;
    let advanced = previous.as_deref() != Some(note.as_bytes());
    if advanced {
        sink.replace(&latest_name, note.as_bytes()).await?;
    }
    Ok(Some(Published {
        tenant_id: tenant_id.to_owned(),
        tree_size: size,
        advanced,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_ids_are_one_segment_and_notes_parse() {
        assert_eq!(tenant_prefix("acme"), "checkpoints/acme/");
        assert_eq!(tenant_prefix("org/a:b"), "checkpoints/org%2Fa%3Ab/");
        let root = [7u8; 32];
        let note = format!(
            "spendguard.io/audit/acme\n12\n{}\n\n\u{2014} k sig\n",
            BASE64.encode(root)
        );
        assert_eq!(
            note_head(note.as_bytes()),
            Some(("spendguard.io/audit/acme".into(), 12, root))
        );
        assert_eq!(note_head(b"spendguard.io/audit/acme\nx\n"), None);
    }
}
