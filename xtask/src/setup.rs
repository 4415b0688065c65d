//! Installs what building and testing need, idempotently: Debian packages,
//! bpf-linker and cargo-fuzz. The eBPF recipe itself lives in agent/build.rs.

use std::{path::Path, process::Command};

use anyhow::{bail, Result};

use crate::status;

/// rustc-web/cargo-web/rust-web-src: a compiler whose library source matches
/// exactly, so `core` can be built for bpfel-unknown-none. llvm-22-dev: what
/// bpf-linker links against. The rest: what the tests and the demo run.
const PACKAGES: [&str; 22] = [
    "rustc-web",
    "cargo-web",
    "rust-web-src",
    "llvm-22-dev",
    "curl",
    "iproute2",
    "python3",
    "util-linux",
    "dnsmasq-base",
    "openssl",
    // Real clients and servers for tests/names.rs.
    "openssh-client",
    "openssh-server",
    "redis-server",
    "redis-tools",
    // A real clone against `git http-backend` for tests/credentials.rs.
    "git",
    // tests/deploy.rs: `systemd-analyze verify` of the unit, shellcheck of
    // register-pod.sh; pip for the PyPI packages below.
    "systemd",
    "shellcheck",
    "python3-pip",
    // tests/exec.rs: Node's fetch and Java's HttpClient (run from source)
    // trusting the agent through exec's variables; keytool reads the truststore.
    "nodejs",
    "openjdk-17-jdk-headless",
    // tests/deploy.rs: the OCI seccomp profile applied by a real runtime.
    "runc",
    // tests/duplex.rs: uploads to nginx's WebDAV PUT.
    "nginx",
];
/// PyPI packages for Debian's python3 (the one the tests run), pinned:
/// kubernetes-validate checks deploy/kubernetes/ against the Kubernetes
/// schemas it ships (offline); prometheus-client parses /metrics;
/// websockets is both ends of the WebSocket tests; boto3 uploads to moto's
/// S3 server in tests/duplex.rs; the official MCP SDK (mcp), gql and
/// graphql-core are the clients and servers of tests/l7_messages.rs;
/// ocsf-json-schema (OCSF's compiled schema exports, 1.0.0-rc.2 to 1.8.0)
/// and jsonschema check the agent's OCSF events (tests/support/ocsf_validate.py).
/// grpcio is the gRPC client and server of the HTTP/2 tests (tests/h2.rs).
/// A name may carry extras (`moto[server]`).
const PYTHON_PACKAGES: [(&str, &str); 12] = [
    ("kubernetes-validate", "1.37.0"),
    ("prometheus-client", "0.26.0"),
    ("websockets", "17.4"),
    ("boto3", "1.44.5"),
    ("botocore", "1.44.18"),
    ("moto[server]", "5.2.5"),
    ("mcp", "2.3.0"),
    ("gql[requests]", "3.5.3"),
    ("graphql-core", "3.2.6"),
    ("ocsf-json-schema", "1.2.0"),
    ("jsonschema", "4.26.0"),
    ("grpcio", "1.85.4"),
];
const PYTHON: &str = "/usr/bin/python3";
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";
const CARGO_FUZZ_VERSION: &str = "0.13.2";

pub fn run() -> Result<()> {
    ensure_packages(&PACKAGES)?;
    if installed_version("bpf-linker").as_deref() != Some(BPF_LINKER_VERSION) {
        eprintln!("xtask setup: installing bpf-linker {BPF_LINKER_VERSION} (LLVM 22)");
        let path = format!("{LLVM_BIN}:{}", std::env::var("PATH").unwrap_or_default());
        status(
            Command::new("cargo")
                .args(["install", "bpf-linker", "--locked", "--force", "--version", BPF_LINKER_VERSION])
                .args(["--no-default-features", "--features", "llvm-22"])
                .env("PATH", path),
        )?;
    }
    if installed_version("cargo-fuzz").as_deref() != Some(CARGO_FUZZ_VERSION) {
        eprintln!("xtask setup: installing cargo-fuzz {CARGO_FUZZ_VERSION}");
        // A debug build installs in half the time, and cargo-fuzz only
        // launches cargo and the fuzz targets.
        status(
            Command::new("cargo")
                .args(["install", "cargo-fuzz", "--locked", "--force", "--version", CARGO_FUZZ_VERSION])
                .arg("--debug"),
        )?;
    }
    ensure_python_packages()?;
    check()?;
    check_cargo_fuzz()
}

/// Installs the pinned PyPI packages unless each is there at its version.
fn ensure_python_packages() -> Result<()> {
    let missing: Vec<String> = PYTHON_PACKAGES
        .iter()
        .filter(|(name, version)| {
            let without_extras = name.split('[').next().unwrap_or(name);
            python_package_version(without_extras).as_deref() != Some(*version)
        })
        .map(|(name, version)| format!("{name}=={version}"))
        .collect();
    if !missing.is_empty() {
        eprintln!("xtask setup: installing {} (pip)", missing.join(" "));
        // Debian's python3 is "externally managed": these go to /usr/local,
        // apart from Debian's own python3-* packages.
        status(
            Command::new(PYTHON)
                .args(["-m", "pip", "install", "--quiet", "--break-system-packages", "--root-user-action=ignore"])
                .args(&missing),
        )?;
    }
    Ok(())
}

/// The installed version of a PyPI package for Debian's python3.
fn python_package_version(name: &str) -> Option<String> {
    let output = Command::new(PYTHON)
        .args(["-c", "import importlib.metadata, sys; print(importlib.metadata.version(sys.argv[1]))", name])
        .output()
        .ok()?;
    output.status.success().then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// Installs the Debian packages that are missing (nothing, quickly, when none is).
pub fn ensure_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|package| !package_installed(package)).collect();
    if !missing.is_empty() {
        eprintln!("xtask setup: installing {}", missing.join(" "));
        status(Command::new("apt-get").args(["update", "-q"]))?;
        status(
            Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    Ok(())
}

/// Fails with the fix when something the build needs is missing.
pub fn check() -> Result<()> {
    let missing: Vec<&str> = PACKAGES[..4].iter().copied().filter(|package| !package_installed(package)).collect();
    if !missing.is_empty() {
        bail!("missing Debian packages {}: run `cargo xtask setup` (as root)", missing.join(" "));
    }
    if installed_version("bpf-linker").is_none() {
        bail!("bpf-linker not found on PATH: run `cargo xtask setup`");
    }
    if !Path::new("/usr/lib/rustlib/src/rust/library/core").exists() {
        bail!("/usr/lib/rustlib/src/rust (from rust-web-src) has no library/core: reinstall rust-web-src");
    }
    Ok(())
}

fn package_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|output| output.stdout.ends_with(b"install ok installed"))
}

/// Fails with the fix unless the pinned cargo-fuzz is installed.
pub fn check_cargo_fuzz() -> Result<()> {
    match installed_version("cargo-fuzz") {
        Some(version) if version == CARGO_FUZZ_VERSION => Ok(()),
        found => bail!(
            "cargo-fuzz {CARGO_FUZZ_VERSION} needed, {} found: run `cargo xtask setup`",
            found.as_deref().unwrap_or("none")
        ),
    }
}

/// The version `program --version` prints as "<name> <version>".
fn installed_version(program: &str) -> Option<String> {
    let output = Command::new(program).arg("--version").output().ok()?;
    let text = String::from_utf8(output.stdout).ok()?;
    text.split_whitespace().nth(1).map(str::to_owned)
}
