fn main() {
    sockacct::cli::main()
}
