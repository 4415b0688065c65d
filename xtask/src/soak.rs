//! `cargo xtask soak [--seconds N]`: the load soak of tests/load.rs (64
//! sandboxed clients, mixed allowed and denied transfers, every byte, log
//! line and the agent's fds and memory checked) run for longer than CI does.

use anyhow::Result;

use crate::{build_agent, cargo, require_root, setup, status};

/// How long `cargo xtask soak` runs without `--seconds`.
pub const DEFAULT_SECONDS: u64 = 600;

pub fn run(seconds: u64) -> Result<()> {
    require_root("soak")?;
    setup::run()?;
    // The debug build, as `cargo xtask test` uses: overflow checks and debug
    // assertions stay on for the whole soak.
    let agent = build_agent(false)?;
    status(
        cargo()
            .args(["test", "--package", "e2e", "--test", "load", "soak", "--", "--nocapture"])
            .env("SE_SOAK_SECS", seconds.to_string())
            .env("SANDBOX_EGRESS_BIN", agent),
    )
}
