//! The `shoal` CLI built inside this package, so tests can run it as a child process
//! (`CARGO_BIN_EXE_shoal-under-test`) without depending on build order across packages.

use std::process::ExitCode;

fn main() -> ExitCode {
    shoal_node::cli::run(shoal_node::cli::parse())
}
