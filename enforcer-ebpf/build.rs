use std::process::ExitCode;

/// The eBPF object is linked by `bpf-linker`, an undeclared dependency:
/// rebuild when the linker binary changes (e.g. `cargo xtask setup` rebuilt it).
fn main() -> ExitCode {
    match which::which("bpf-linker") {
        Ok(path) => {
            println!("cargo:rerun-if-changed={}", path.display());
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("bpf-linker not found ({err}); run `cargo xtask setup`");
            ExitCode::FAILURE
        }
    }
}
