//! `cargo xtask fuzz`: builds the cargo-fuzz targets in fuzz/ and runs them
//! side by side for a bounded time. What each asserts is in fuzz/fuzz_targets/.

use std::{
    fs::{self, File},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Instant,
};

use anyhow::{bail, Context, Result};

use crate::{cargo, setup, status, target_dir, workspace_root};

pub const TARGETS: [&str; 6] =
    ["sniff_classify", "tls_client_hello", "http_request_head", "l7_classify", "websocket_client_frames", "h2_request"];
/// Seconds each target runs in `cargo xtask test`.
pub const TEST_SECONDS: u64 = 15;
const TRIPLE: &str = "x86_64-unknown-linux-gnu";
/// Above the parsers' bounds (32 KiB for a request head, about 16 KiB for a
/// ClientHello on the wire) plus the targets' leading control bytes, so that
/// inputs can reach them.
const MAX_INPUT_LEN: usize = 34 * 1024;
/// A target that grows past this fails instead of taking the machine's memory.
const RSS_LIMIT_MB: u32 = 2048;
/// The targets never wait: an input that takes this long is a hang.
const INPUT_TIMEOUT_SECONDS: u32 = 10;

#[derive(clap::Args)]
pub struct Args {
    /// Seconds each target runs.
    #[arg(long, default_value_t = 300)]
    seconds: u64,
    /// Targets to run; all when none is named.
    #[arg(value_parser = clap::builder::PossibleValuesParser::new(TARGETS))]
    targets: Vec<String>,
}

pub fn run(args: &Args) -> Result<()> {
    let targets: Vec<&str> =
        if args.targets.is_empty() { TARGETS.to_vec() } else { args.targets.iter().map(String::as_str).collect() };
    let outcomes = build_and_run(&targets, args.seconds)?;
    let failed = outcomes.iter().filter(|&&passed| !passed).count();
    if failed > 0 {
        bail!("{failed} of {} fuzz targets failed", outcomes.len());
    }
    Ok(())
}

/// Builds the targets, then runs them side by side for `seconds` each and
/// prints how each went; whether each passed, in the order given.
pub fn build_and_run(targets: &[&str], seconds: u64) -> Result<Vec<bool>> {
    build()?;
    let runs: Vec<Run> = targets.iter().map(|target| Run::start(target, seconds)).collect::<Result<_>>()?;
    runs.into_iter().map(Run::finish).collect()
}

/// Where the build, the working corpora, the crash inputs and the logs go.
fn fuzz_dir() -> PathBuf {
    target_dir().join("fuzz")
}

fn build() -> Result<()> {
    // The agent's build script builds the eBPF object, as for any agent build.
    setup::check()?;
    setup::check_cargo_fuzz()?;
    let started = Instant::now();
    let mut build = cargo();
    build
        .args(["fuzz", "build", "--fuzz-dir", "fuzz"])
        // The fuzzed parsers are safe Rust (bounds are checked by the
        // language): without AddressSanitizer the same seconds run 5-8x as
        // many inputs and the build takes a quarter less. cargo-fuzz still
        // passes -Z flags, so stable needs RUSTC_BOOTSTRAP=1.
        .args(["--sanitizer", "none"])
        .arg("--target-dir")
        .arg(fuzz_dir())
        .env("RUSTC_BOOTSTRAP", "1");
    status(&mut build)?;
    println!("fuzz: targets built in {:.0?}", started.elapsed());
    Ok(())
}

/// One target's fuzzer, running.
struct Run<'t> {
    target: &'t str,
    seconds: u64,
    binary: PathBuf,
    log_path: PathBuf,
    fuzzer: Child,
}

impl<'t> Run<'t> {
    fn start(target: &'t str, seconds: u64) -> Result<Self> {
        let fuzz_dir = fuzz_dir();
        let binary = fuzz_dir.join(TRIPLE).join("release").join(target);
        let corpus = fuzz_dir.join("corpus").join(target);
        let artifacts = fuzz_dir.join("artifacts").join(target);
        let logs = fuzz_dir.join("logs");
        for dir in [&corpus, &artifacts, &logs] {
            fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        }
        let log_path = logs.join(format!("{target}.log"));
        let log = File::create(&log_path).with_context(|| format!("create {}", log_path.display()))?;
        let fuzzer = Command::new(&binary)
            // New inputs go to the first directory; the committed seeds are only read.
            .arg(&corpus)
            .arg(workspace_root().join("fuzz/seeds").join(target))
            .arg(format!("-max_total_time={seconds}"))
            .arg(format!("-max_len={MAX_INPUT_LEN}"))
            .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
            .arg(format!("-timeout={INPUT_TIMEOUT_SECONDS}"))
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .arg("-print_final_stats=1")
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("run {}", binary.display()))?;
        Ok(Self { target, seconds, binary, log_path, fuzzer })
    }

    /// Waits for the fuzzer, prints how it went and whether it passed.
    fn finish(self) -> Result<bool> {
        let Self { target, seconds, binary, log_path, mut fuzzer } = self;
        let exit = fuzzer.wait()?;
        let output = fs::read_to_string(&log_path).with_context(|| format!("read {}", log_path.display()))?;
        let executions = executions(&output).map_or_else(|| "an unknown number of".to_string(), |n| n.to_string());
        if exit.success() {
            println!("fuzz {target}: {executions} executions in {seconds} s, passed");
            return Ok(true);
        }
        println!("fuzz {target}: FAILED ({exit}) after {executions} executions; log: {}", log_path.display());
        for line in failure_report(&output) {
            println!("    {line}");
        }
        match crash_input(&output) {
            Some(input) => println!("    input: {input}\n    reproduce: {} {input}", binary.display()),
            None => println!("    no input was saved"),
        }
        Ok(false)
    }
}

/// From `-print_final_stats=1`, which libFuzzer prints on crashes too.
fn executions(output: &str) -> Option<u64> {
    output.lines().find_map(|line| line.strip_prefix("stat::number_of_executed_units:")?.trim().parse().ok())
}

/// The lines that say what went wrong: a panic's message or libFuzzer's
/// error (out of memory, a timeout), without the stack trace that follows.
fn failure_report(output: &str) -> impl Iterator<Item = &str> {
    output
        .lines()
        .skip_while(|line| !line.contains("panicked at") && !line.contains("ERROR:"))
        .take_while(|line| !line.starts_with("stack backtrace:") && !line.trim_start().starts_with("#0 "))
        .take(12)
}

fn crash_input(output: &str) -> Option<&str> {
    output.lines().find_map(|line| Some(line.split_once("Test unit written to ")?.1.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The end of a real run that hit a failing assertion.
    const CRASHED: &str =
        "#949\tNEW    cov: 232 ft: 286 corp: 20/72b lim: 8 exec/s: 0 rss: 28Mb L: 4/7 MS: 5 CopyPart-\n\
        \n\
        thread '<unnamed>' (8960) panicked at fuzz_targets/sniff_classify.rs:83:42:\n\
        assertion `left == right` failed\n\
        \x20 left: \"malformed request head: invalid token\"\n\
        \x20right: \"connection closed before the request head was complete\"\n\
        stack backtrace:\n\
        \x20  0: __rustc::rust_begin_unwind\n\
        ==8960== ERROR: libFuzzer: deadly signal\n\
        SUMMARY: libFuzzer: deadly signal\n\
        artifact_prefix='target/fuzz/artifacts/sniff_classify/'; \
        Test unit written to target/fuzz/artifacts/sniff_classify/crash-eefa26c3\n\
        Base64: AEQEREo=\n\
        stat::number_of_executed_units: 956\n\
        stat::average_exec_per_sec:     0\n";

    #[test]
    fn a_crash_is_reported_with_its_message_and_input() {
        assert_eq!(executions(CRASHED), Some(956));
        assert_eq!(
            failure_report(CRASHED).collect::<Vec<_>>(),
            [
                "thread '<unnamed>' (8960) panicked at fuzz_targets/sniff_classify.rs:83:42:",
                "assertion `left == right` failed",
                "  left: \"malformed request head: invalid token\"",
                " right: \"connection closed before the request head was complete\"",
            ]
        );
        assert_eq!(crash_input(CRASHED), Some("target/fuzz/artifacts/sniff_classify/crash-eefa26c3"));
    }

    #[test]
    fn every_target_has_a_source_and_seeds() {
        let fuzz = workspace_root().join("fuzz");
        for target in TARGETS {
            let source = fuzz.join("fuzz_targets").join(format!("{target}.rs"));
            assert!(source.is_file(), "no {}", source.display());
            let seeds = fuzz.join("seeds").join(target);
            assert!(fs::read_dir(&seeds).map_or(0, Iterator::count) > 0, "no seeds in {}", seeds.display());
        }
    }
}
