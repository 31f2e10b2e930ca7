//! The `shoal` binary: parses the command line and maps the outcome to an exit code.

use std::process::ExitCode;

fn main() -> ExitCode {
    shoal_node::cli::run(shoal_node::cli::parse())
}
