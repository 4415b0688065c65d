//! A thousand sandboxes on one daemon, added and removed through the
//! control socket: each decided by its own policy (most share one file,
//! some have their own), removed ones closed, the rest still served. What
//! they cost (daemon memory and descriptors per sandbox, add and remove
//! times) is printed as figures, never asserted: `cargo xtask bench` has
//! the table and its targets.

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use e2e::*;
use serde_json::{json, Value};

const SANDBOXES: usize = 1000;
/// The first sandboxes have a policy file of their own: even ones allow the
/// test host's HTTP port, odd ones do not.
const DISTINCT: usize = 10;

fn spec(name: &str, cgroup: &Sandbox, policy: &PolicyFile) -> Value {
    json!({"op": "sandbox_add", "spec": {"name": name, "cgroup": cgroup.path, "policy": policy.path}})
}

/// Curls the test host from `cgroup`: the daemon's verdict for sandbox `name`.
fn verdict(daemon: &AgentDaemon, net: &TestNet, cgroup: &Sandbox, name: &str) -> Result<String> {
    let (pid, _) = curl(Some(cgroup), &format!("http://{}:{HTTP_PORT}/bytes/1", net.private_v4))?;
    let line = daemon.agent.wait_connection_of(pid)?;
    ensure!(line["sandbox"] == name, "connection of {name} logged for another sandbox: {line}");
    Ok(line["verdict"].as_str().unwrap_or_default().to_owned())
}

#[test]
fn a_thousand_sandboxes_are_each_decided_by_their_own_policy_and_removed_ones_stay_closed() -> Result<()> {
    require_root();
    let net = TestNet::new()?;
    let _servers = net.start_servers()?;
    let daemon = AgentDaemon::start(&[])?;
    let allowing = net.allow_all_policy();
    let denying = allowing.replace(&format!("[{HTTP_PORT}, {EXCHANGE_PORT}]"), &format!("[{EXCHANGE_PORT}]"));
    let shared = PolicyFile::new(&allowing)?;
    let distinct: Vec<PolicyFile> =
        (0..DISTINCT).map(|i| PolicyFile::new(if i % 2 == 0 { &allowing } else { &denying })).collect::<Result<_>>()?;
    let cgroups: Vec<Sandbox> = (0..SANDBOXES).map(|i| Sandbox::new(&format!("scale-{i}"))).collect::<Result<_>>()?;
    let name = |i: usize| format!("scale-{i}");

    let mut control = ControlClient::connect(&daemon.socket)?;
    // The first add binds the shared listener: counted in the baseline.
    control.request(&spec(&name(0), &cgroups[0], &distinct[0]))?;
    let (rss_first, fds_first) = process_usage(daemon.agent.pid())?;
    let mut adds = Vec::with_capacity(SANDBOXES);
    for (i, cgroup) in cgroups.iter().enumerate().skip(1) {
        let policy = distinct.get(i).unwrap_or(&shared);
        let started = Instant::now();
        control.request(&spec(&name(i), cgroup, policy))?;
        adds.push(started.elapsed());
    }
    let (rss_all, fds_all) = process_usage(daemon.agent.pid())?;
    let status = control.request(&json!({"op": "status"}))?;
    let served = status["sandboxes"].as_array().map_or(0, Vec::len);
    ensure!(served == SANDBOXES, "{served} sandboxes served");
    ensure!(status["policy_files"] == DISTINCT + 1, "one policy per file: {}", status["policy_files"]);
    // The files of the same text share one compiled policy: allowing and denying.
    ensure!(status["compiled_policies"] == 2, "one compiled policy per text: {}", status["compiled_policies"]);
    let shared_listener = status["sandboxes"].as_array().into_iter().flatten().all(|s| s["shared_listener"] == true);
    ensure!(shared_listener, "every sandbox shares the daemon's listener");

    // A sample, each decided by its own policy.
    for i in [0, 1, 2, 7, 500, SANDBOXES - 1] {
        let expected = if i < DISTINCT && i % 2 == 1 { "denied" } else { "relayed" };
        assert_eq!(verdict(&daemon, &net, &cgroups[i], &name(i))?, expected, "sandbox {i}");
    }

    // The second half goes; its cgroups stay closed.
    let mut removes = Vec::with_capacity(SANDBOXES / 2);
    for i in SANDBOXES / 2..SANDBOXES {
        let started = Instant::now();
        control.request(&json!({"op": "sandbox_remove", "name": name(i)}))?;
        removes.push(started.elapsed());
    }
    let (rss_half, fds_half) = process_usage(daemon.agent.pid())?;
    for i in [SANDBOXES / 2, SANDBOXES - 1] {
        let (pid, output) = curl(Some(&cgroups[i]), &format!("http://{}:{HTTP_PORT}/bytes/1", net.private_v4))?;
        assert_eq!(output.status.code(), Some(7), "removed sandbox {i} must stay closed");
        ensure!(daemon.agent.connections_of(pid).is_empty(), "removed sandbox {i} reached the daemon");
    }
    for i in [0, 1, 3, SANDBOXES / 2 - 1] {
        let expected = if i < DISTINCT && i % 2 == 1 { "denied" } else { "relayed" };
        assert_eq!(verdict(&daemon, &net, &cgroups[i], &name(i))?, expected, "sandbox {i} after the removals");
    }

    let per = |total: u64, count: usize| total as f64 / count as f64;
    println!("{SANDBOXES} sandboxes ({} policy files):", DISTINCT + 1);
    println!(
        "  daemon memory: {rss_first} KiB with one sandbox, {rss_all} KiB with {SANDBOXES}, {rss_half} KiB after removing \
         half: {:.1} KiB per sandbox beyond the first",
        per(rss_all.saturating_sub(rss_first), SANDBOXES - 1)
    );
    println!(
        "  descriptors: {fds_first} with one sandbox, {fds_all} with {SANDBOXES}, {fds_half} after removing half: \
         {:.3} per sandbox beyond the first",
        per(fds_all.saturating_sub(fds_first) as u64, SANDBOXES - 1)
    );
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "  sandbox add: p50 {:.2} ms, p99 {:.2} ms; sandbox remove: p50 {:.2} ms, p99 {:.2} ms",
        ms(percentile(&mut adds, 50)),
        ms(percentile(&mut adds, 99)),
        ms(percentile(&mut removes, 50)),
        ms(percentile(&mut removes, 99))
    );

    // Detached through the daemon, so no pins outlive the test.
    for i in 0..SANDBOXES / 2 {
        control.request(&json!({"op": "sandbox_remove", "name": name(i), "detach": true, "force": true}))?;
    }
    Ok(())
}

#[test]
fn sandboxes_beyond_max_sandboxes_are_refused_with_the_flag_named() -> Result<()> {
    require_root();
    let net = TestNet::new()?;
    let daemon = AgentDaemon::start(&["--max-sandboxes", "2"])?;
    let policy = PolicyFile::new(&net.allow_all_policy())?;
    let cgroups: Vec<Sandbox> = (0..3).map(|i| Sandbox::new(&format!("limit-{i}"))).collect::<Result<_>>()?;
    let mut control = ControlClient::connect(&daemon.socket)?;
    for (i, cgroup) in cgroups.iter().enumerate().take(2) {
        control.request(&spec(&format!("limit-{i}"), cgroup, &policy))?;
    }
    let refused = control.request(&spec("limit-2", &cgroups[2], &policy)).unwrap_err().to_string();
    ensure!(refused.contains("--max-sandboxes"), "{refused}");
    // One flag name on every command, the old one kept as an alias.
    for (command, flag) in [(&["sandbox", "list"][..], "--control-socket"), (&["status"][..], "--socket")] {
        let output = std::process::Command::new(agent_bin()).args(command).args([flag, &daemon.socket]).output()?;
        ensure!(output.status.success(), "{command:?} {flag}: {}", String::from_utf8_lossy(&output.stderr));
    }
    control.request(&json!({"op": "sandbox_remove", "name": "limit-0", "detach": true}))?;
    control.request(&spec("limit-2", &cgroups[2], &policy))?;
    for name in ["limit-1", "limit-2"] {
        control.request(&json!({"op": "sandbox_remove", "name": name, "detach": true}))?;
    }
    Ok(())
}
