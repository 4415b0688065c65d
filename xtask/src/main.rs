//! Project tasks: `cargo xtask <setup|build|run|demo|test|fuzz|bench|soak|modules>`.

mod bench;
mod demo;
mod fuzz;
mod modules;
mod setup;
mod soak;

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the toolchain and test tools (idempotent; quick when done).
    Setup,
    /// Build the agent (with its embedded eBPF object).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Build and run the agent with the given arguments (as root).
    Run {
        #[arg(long)]
        release: bool,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, then show the agent on a demo sandbox with a "remote" server.
    Demo,
    /// Set up, then run every test: unit tests and end-to-end tests on the real kernel (as root).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build the fuzz targets (fuzz/) and run them side by side for a bounded time.
    Fuzz(fuzz::Args),
    /// Set up, then measure direct vs the agent vs squid/tinyproxy/haproxy (as root).
    Bench(bench::Args),
    /// Check agent/src for import circles between modules (part of `test`).
    Modules,
    /// Set up, then run the load soak of tests/load.rs for longer than CI does (as root).
    Soak {
        /// How long the 64 sandboxed clients keep transferring.
        #[arg(long, default_value_t = soak::DEFAULT_SECONDS)]
        seconds: u64,
    },
}

fn main() -> ExitCode {
    let outcome = match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::Build { release } => build_agent(release).map(drop),
        Task::Run { release, args } => run_agent(release, &args),
        Task::Demo => demo::run(),
        Task::Test { args } => test(&args),
        Task::Fuzz(args) => fuzz::run(&args),
        Task::Bench(args) => bench::run(&args),
        Task::Modules => modules::check(&workspace_root().join("agent/src/lib.rs")),
        Task::Soak { seconds } => soak::run(seconds),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: {error:#}");
            ExitCode::FAILURE
        }
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

pub fn cargo() -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.current_dir(workspace_root());
    // A relative CARGO_TARGET_DIR names the caller's directory, not the workspace.
    if std::env::var_os("CARGO_TARGET_DIR").is_some() {
        command.env("CARGO_TARGET_DIR", target_dir());
    }
    command
}

/// Cargo's target directory: `$CARGO_TARGET_DIR` if set, else `target/`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => std::env::current_dir().unwrap_or_else(|_| workspace_root()).join(dir),
        None => workspace_root().join("target"),
    }
}

pub fn status(command: &mut Command) -> Result<()> {
    let status = command.status().with_context(|| format!("spawn {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok(())
}

/// Builds the agent and returns the binary's path.
pub fn build_agent(release: bool) -> Result<PathBuf> {
    setup::check()?;
    let mut build = cargo();
    build.args(["build", "--package", "agent"]);
    if release {
        build.arg("--release");
    }
    status(&mut build)?;
    let profile = if release { "release" } else { "debug" };
    Ok(target_dir().join(profile).join("sandbox-egress"))
}

fn run_agent(release: bool, args: &[String]) -> Result<()> {
    let agent = build_agent(release)?;
    status(Command::new(agent).args(args))
}

pub fn require_root(task: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("`cargo xtask {task}` attaches eBPF programs to cgroups and must run as root");
    }
    Ok(())
}

fn test(args: &[String]) -> Result<()> {
    require_root("test")?;
    setup::run()?;
    lint()?;
    modules::check(&workspace_root().join("agent/src/lib.rs"))?;
    let agent = build_agent(false)?;
    let mut child = cargo()
        .args(["test", "--workspace", "--exclude", "agent-ebpf"])
        .args(args)
        .env("SANDBOX_EGRESS_BIN", agent)
        .stdout(Stdio::piped())
        .spawn()?;
    // cargo prints one "test result" line per test binary, the last often a
    // doc-test run with 0 tests: add them up into one closing line.
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line?;
        println!("{line}");
        if let Some(result) = line.strip_prefix("test result: ") {
            passed += count_before(result, "passed");
            failed += count_before(result, "failed");
        }
    }
    let exit = child.wait()?;
    // A short run of every fuzz target, each counted as one test.
    let fuzzed = fuzz::build_and_run(&fuzz::TARGETS, fuzz::TEST_SECONDS);
    match &fuzzed {
        Ok(outcomes) => {
            let fuzz_passed = outcomes.iter().filter(|&&passed| passed).count() as u64;
            passed += fuzz_passed;
            failed += outcomes.len() as u64 - fuzz_passed;
        }
        Err(_) => failed += fuzz::TARGETS.len() as u64,
    }
    println!("tests: {passed} passed, {failed} failed");
    if !exit.success() {
        bail!("cargo test failed: {exit}");
    }
    if fuzzed?.contains(&false) {
        bail!("a fuzz target failed");
    }
    Ok(())
}

/// Formatting and lints, before anything slow: fails with the command that fixes it.
fn lint() -> Result<()> {
    let fuzz_manifest = workspace_root().join("fuzz/Cargo.toml");
    let formatted = cargo().args(["fmt", "--all", "--", "--check"]).status()?.success()
        && cargo().arg("fmt").arg("--manifest-path").arg(&fuzz_manifest).args(["--", "--check"]).status()?.success();
    if !formatted {
        bail!("the tree is not rustfmt-formatted: run `cargo fmt --all && cargo fmt --manifest-path fuzz/Cargo.toml`");
    }
    // agent-ebpf is not linted: clippy would have to build `core` for
    // bpfel-unknown-none, which only Debian's rustc-web can (it ships the
    // matching library source) and Debian ships no clippy for it; rustup's
    // clippy has no rust-src here.
    let clippy = cargo()
        .args(["clippy", "--workspace", "--exclude", "agent-ebpf", "--all-targets", "--", "-D", "warnings"])
        .status()?;
    if !clippy.success() {
        bail!(
            "clippy found warnings: fix them (see above; `cargo clippy --workspace --exclude agent-ebpf --all-targets` \
             lists them, `--fix` applies the suggested ones)"
        );
    }
    Ok(())
}

/// In "ok. 11 passed; 0 failed; ...", the number before `label`.
fn count_before(result: &str, label: &str) -> u64 {
    result
        .split(';')
        .find_map(|part| part.trim().trim_start_matches("ok. ").trim_start_matches("FAILED. ").strip_suffix(label))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}
