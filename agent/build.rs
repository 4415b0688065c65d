//! Builds the eBPF object (agent-ebpf) and hands it to the agent to embed.
//!
//! The eBPF crate needs `core` built from source for bpfel-unknown-none with a
//! compiler whose library source matches exactly: Debian's rustc-web + rust-web-src
//! (see shared/TOOLCHAIN.md). `cargo xtask setup` installs them and bpf-linker.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

const DEBIAN_CARGO: &str = "/usr/bin/cargo";
const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
const RUST_SRC: &str = "/usr/lib/rustlib/src/rust";

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let workspace = manifest_dir.parent().unwrap();
    for watched in ["agent-ebpf/src", "agent-ebpf/Cargo.toml", "agent-common/src", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={}", workspace.join(watched).display());
    }

    let missing: Vec<&str> =
        [DEBIAN_CARGO, DEBIAN_RUSTC, RUST_SRC].into_iter().filter(|path| !Path::new(path).exists()).collect();
    let linker = find_in_path("bpf-linker");
    if !missing.is_empty() || linker.is_none() {
        panic!(
            "cannot build the eBPF object: missing {}{}. Run `cargo xtask setup` first.",
            missing.join(", "),
            if linker.is_none() { " bpf-linker" } else { "" }
        );
    }

    let target_dir = workspace.join("target/ebpf");
    let mut build = Command::new(DEBIAN_CARGO);
    // The outer cargo's variables (RUSTC, RUSTFLAGS, CARGO_*) must not leak into
    // the nested build: it uses a different compiler and target.
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        if (key.starts_with("CARGO") && key != "CARGO_HOME") || key.starts_with("RUSTC") || key == "RUSTFLAGS" {
            build.env_remove(key);
        }
    }
    build
        .current_dir(workspace)
        .env("RUSTC", DEBIAN_RUSTC)
        .env("RUSTC_BOOTSTRAP", "1")
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            ["--cfg=bpf_target_arch=\"x86_64\"", "-Cdebuginfo=2", "-Clink-arg=--btf"].join("\x1f"),
        )
        .args(["build", "--package", "agent-ebpf", "--bins", "--release"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&target_dir);
    let status = build.status().expect("failed to run Debian's cargo for the eBPF build");
    if !status.success() {
        panic!("eBPF build failed ({status}); see the output above");
    }

    let object = target_dir.join("bpfel-unknown-none/release/agent-ebpf");
    let out = PathBuf::from(env::var_os("OUT_DIR").unwrap()).join("agent-ebpf.o");
    std::fs::copy(&object, &out).unwrap_or_else(|e| panic!("copy {} -> {}: {e}", object.display(), out.display()));
}

fn find_in_path(program: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path).map(|dir| dir.join(program)).find(|candidate| candidate.is_file())
}
