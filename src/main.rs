//! The `chatshard` binary: everything lives in the library; see [`chatshard::cli`].

fn main() -> std::process::ExitCode {
    chatshard::cli::main()
}
