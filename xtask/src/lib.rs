//! The development stack that `cargo xtask` and its lab share: a project-local PostgreSQL cluster
//! (`pg`), the settings the commands read (`settings`), seed data generated inside PostgreSQL
//! (`seed`), and the service's binaries run as child processes (`stack`); for the scale-out
//! topology (`topology`), a streaming replica of a cluster (`pg`), PgBouncer (`pgbouncer`) and
//! nginx with TLS (`nginx`).
//!
//! It links none of the workspace's crates: `cargo xtask` builds and starts the `api`, `upstream`
//! and `loadtest` binaries instead, so its own debug build takes seconds. The chaos runs and
//! benchmarks, which drive the stand-in and the load generator in-process, are the `lab` binary
//! (`src/bin/lab`, feature `lab`), built in release when one of them is asked for.

pub mod netns;
pub mod nginx;
pub mod pg;
pub mod pgbouncer;
pub mod seed;
pub mod settings;
pub mod stack;
pub mod topology;

/// Enters the workspace root: paths in the settings (config/, migrations/, target/) are relative
/// to it, wherever `cargo xtask` was typed.
///
/// # Errors
///
/// When the root cannot be entered.
pub fn enter_workspace() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow::anyhow!("xtask is not inside the workspace"))?;
    std::env::set_current_dir(root)
        .map_err(|e| anyhow::anyhow!("cannot enter the workspace root: {e}"))
}

/// The exit code of a command, with its error printed as one readable line per cause (a
/// backtrace helps nobody running a developer command).
pub fn exit_code(result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
