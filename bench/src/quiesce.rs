//! Each measured phase starts from a quiet disk.
//!
//! PostgreSQL 15 extends a relation by writing zero-filled pages through the page cache, and its
//! checkpoints write dirty buffers the same way. Linux holds such pages up to
//! `vm.dirty_expire_centisecs` (30 s by default) and then writes them back in one burst: after a
//! sweep at ~5,000 pairs/s that is hundreds of megabytes, and every WAL flush queued behind it
//! waits tens of milliseconds (measured 2026-11-26: a `fdatasync` probe saw 59 ms while 252 MB
//! were written back in one second). Without this, a phase measures the previous phase's
//! writeback as much as its own load.

use anyhow::{Context, Result, ensure};
use sqlx::Connection as _;

/// Writes out what earlier phases left dirty: a CHECKPOINT for PostgreSQL's buffers, then
/// `sync` for the kernel's pages.
pub(crate) async fn quiesce(database_url: &str) -> Result<()> {
    let mut connection = sqlx::PgConnection::connect(database_url)
        .await
        .context("connecting to checkpoint")?;
    sqlx::query("CHECKPOINT")
        .execute(&mut connection)
        .await
        .context("CHECKPOINT")?;
    connection.close().await?;
    let status = tokio::process::Command::new("sync")
        .status()
        .await
        .context("running sync")?;
    ensure!(status.success(), "sync failed: {status}");
    Ok(())
}
