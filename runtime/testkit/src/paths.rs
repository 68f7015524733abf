//! Where the checkout is, read when the test runs.
//!
//! Cargo sets `CARGO_MANIFEST_DIR` for every test process it runs, so reading it at run time
//! names the checkout being tested. `env!("CARGO_MANIFEST_DIR")` instead bakes in the path of
//! whichever checkout compiled the binary, and a target directory shared by two checkouts
//! reuses an unchanged crate's binary from the other one: its tests then read the other
//! checkout's files, or fail when that checkout is gone.

use std::ffi::OsStr;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The checkout's root: the nearest directory holding `Cargo.lock` at or above the running
/// package (`CARGO_MANIFEST_DIR` at run time; this crate's own when run without cargo).
///
/// # Panics
/// When no directory above holds `Cargo.lock`.
pub fn repo_root() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let package = std::env::var_os("CARGO_MANIFEST_DIR")
            .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
        package
            .ancestors()
            .find(|dir| dir.join("Cargo.lock").is_file())
            .unwrap_or_else(|| panic!("no Cargo.lock at or above {}", package.display()))
            .to_path_buf()
    })
}

/// [`repo_root`] where a test wants a constant: `format!("{REPO_ROOT}/charts")`,
/// `Path::new(REPO_ROOT)`, `Command::current_dir(REPO_ROOT)`.
pub const REPO_ROOT: &RepoRoot = &RepoRoot;

/// See [`REPO_ROOT`].
#[derive(Debug, Clone, Copy)]
pub struct RepoRoot;

impl fmt::Display for RepoRoot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        repo_root().display().fmt(f)
    }
}

impl AsRef<Path> for RepoRoot {
    fn as_ref(&self) -> &Path {
        repo_root()
    }
}

impl AsRef<OsStr> for RepoRoot {
    fn as_ref(&self) -> &OsStr {
        repo_root().as_os_str()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_root_is_this_checkout() {
        // This crate's manifest, as cargo names it to the running test.
        let package = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap());
        assert_eq!(
            repo_root().canonicalize().unwrap(),
            package.join("../..").canonicalize().unwrap()
        );
        assert!(
            Path::new(REPO_ROOT)
                .join("runtime/testkit/src/paths.rs")
                .is_file()
        );
        assert_eq!(format!("{REPO_ROOT}"), repo_root().display().to_string());
    }
}
