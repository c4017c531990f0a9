//! The `vdisk` binary: [`vdisk_cli::run`] with this process's arguments.

fn main() -> std::process::ExitCode {
    std::process::ExitCode::from(vdisk_cli::run(std::env::args_os()))
}
