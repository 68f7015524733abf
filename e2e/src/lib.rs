//! End-to-end tests live in `tests/`; see `e2e/build-control-plane.sh` for the binaries.
