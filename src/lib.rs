//! The root package `imgate`: it owns the workspace's end-to-end tests (`tests/`) and
//! criterion benches (`benches/`). The code lives in the member crates.
