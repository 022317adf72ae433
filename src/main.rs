//! The `chatshard` binary: everything lives in the library; see [`chatshard::cli`].

/// mimalloc instead of glibc's malloc: see docs/benchmarks.md, "The
/// allocator".
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    chatshard::cli::main()
}
