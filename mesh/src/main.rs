//! The `flatmesh` binary: parse the command line and run it.

fn main() -> std::process::ExitCode {
    flatmesh::cli::main()
}
