fn main() {
    std::process::exit(mxgate::cli::main());
}
