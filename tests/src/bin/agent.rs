//! The agent binary, built inside the test package so tests can find it via CARGO_BIN_EXE.
fn main() {
    sockacct::cli::main()
}
