//! Helpers for the external processes harnesses start.

use anyhow::{Context, Result, bail};
use std::process::{Command, Stdio};

/// Runs `command` to completion; fails with its output when it exits non-zero.
pub(crate) fn run(command: &mut Command) -> Result<()> {
    let output = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// Runs `cleanup` (a shell snippet) once this process has exited, however it exits (a panic,
/// SIGKILL of the test binary, a cancelled CI job), so harness servers never outlive their tests.
pub(crate) fn cleanup_after_exit(cleanup: &str) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let script = format!(
        "while kill -0 {} 2>/dev/null; do sleep 1; done; {cleanup}",
        std::process::id()
    );
    Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .context("spawning the cleanup watchdog")?;
    Ok(())
}
