//! `cargo xtask demo`: the agent's main job on a demo sandbox, narrated.
//! A "remote" server runs in a network namespace; programs in the sandbox
//! cgroup know nothing about proxies, yet every connect goes through the agent.

use anyhow::{ensure, Result};
use e2e::{curl, exchange, url_host, Agent, PolicyFile, Sandbox, TestNet, HTTP_PORT};
use serde_json::Value;

pub fn run() -> Result<()> {
    crate::require_root("demo")?;
    crate::setup::run()?;
    let agent_bin = crate::build_agent(false)?;
    std::env::set_var("SANDBOX_EGRESS_BIN", &agent_bin);

    let net = TestNet::new()?;
    let _servers = net.start_servers()?;
    let sandbox = Sandbox::new("demo")?;
    let policy = PolicyFile::new(&net.allow_all_policy())?;
    step(&format!(
        "remote server at {} and {} (private), {} (public), in network namespace {}",
        net.private_v4, net.private_v6, net.v4, net.netns
    ));
    println!("    policy {}:\n{}", policy.path.display(), indent(&std::fs::read_to_string(&policy.path)?));
    step(&format!(
        "sandbox cgroup {}; starting {} run --cgroup ... --policy ...",
        sandbox.path.display(),
        agent_bin.display()
    ));
    let mut agent = Agent::start(&sandbox, &policy, &[])?;
    println!("    agent listening on 127.0.0.1:{0} and [::1]:{0}", agent.port);

    for ip in [url_host(net.private_v4.into()), url_host(net.private_v6.into())] {
        let url = format!("http://{ip}:{HTTP_PORT}/bytes/1048576");
        step(&format!("sandboxed `curl {url}` (no proxy variables)"));
        let (pid, output) = curl(Some(&sandbox), &url)?;
        println!("    curl: {}", describe_curl(&output));
        println!("    agent: {}", describe_connection(&agent.wait_connection_of(pid)?));
    }

    let mapped = format!("::ffff:{}", net.v4);
    step(&format!("sandboxed raw TCP client on an AF_INET6 socket to {mapped} (v4-mapped)"));
    let (pid, output) = exchange(Some(&sandbox), "inet6", &mapped, 65536, 65536)?;
    println!("    client: {}", String::from_utf8_lossy(&output.stdout).trim());
    println!("    agent: {}", describe_connection(&agent.wait_connection_of(pid)?));

    let url = format!("http://{}:{HTTP_PORT}/bytes/10", net.v4);
    step(&format!("sandboxed plain HTTP to a public address is refused: `curl {url}`"));
    let (pid, output) = e2e::curl_body(&sandbox, &url)?;
    println!("    curl: {}", String::from_utf8_lossy(&output.stdout).trim());
    println!("    agent: {}", describe_connection(&agent.wait_connection_of(pid)?));

    step("the same curl from outside the sandbox is not intercepted");
    let (pid, output) = curl(None, &format!("http://{}:{HTTP_PORT}/bytes/10", net.v4))?;
    println!("    curl: {}", describe_curl(&output));
    ensure!(agent.connections_of(pid).is_empty(), "a process outside the sandbox was intercepted");
    println!("    agent: no record of pid {pid}");

    step("SIGKILL the agent: the sandbox fails closed");
    agent.kill();
    let (_, output) = curl(Some(&sandbox), &format!("http://{}:{HTTP_PORT}/bytes/10", net.private_v4))?;
    println!("    curl: {}", describe_curl(&output));
    ensure!(!output.status.success(), "the sandbox reached the server with the agent dead");

    step("restart the agent: it replaces the pinned links and interception resumes");
    let agent = Agent::start(&sandbox, &policy, &[])?;
    let (pid, output) = curl(Some(&sandbox), &format!("http://{}:{HTTP_PORT}/bytes/10", net.private_v4))?;
    println!("    curl: {}", describe_curl(&output));
    println!("    agent: {}", describe_connection(&agent.wait_connection_of(pid)?));

    step("stop the agent and detach the sandbox; remove the namespace and cgroup");
    drop(agent);
    println!("\ndemo complete");
    Ok(())
}

fn step(text: &str) {
    println!("\n==> {text}");
}

fn describe_curl(output: &std::process::Output) -> String {
    if output.status.success() {
        let fields: Vec<&str> = std::str::from_utf8(&output.stdout).unwrap_or("").split_whitespace().collect();
        format!("HTTP {} with {} body bytes", fields.first().unwrap_or(&"?"), fields.get(1).unwrap_or(&"?"))
    } else {
        format!("failed ({}) {}", output.status, String::from_utf8_lossy(&output.stderr).trim())
    }
}

fn indent(text: &str) -> String {
    text.lines().map(|line| format!("      {line}")).collect::<Vec<_>>().join("\n")
}

fn describe_connection(log: &Value) -> String {
    let reason = log["reason"].as_str().map(|reason| format!(": {reason}")).unwrap_or_default();
    format!(
        "pid {} {} -> {} {} {}{reason} ({} B up, {} B down, {:.1} ms)",
        log["pid"],
        log["exe"].as_str().unwrap_or("?"),
        log["destination"].as_str().unwrap_or("?"),
        log["protocol"].as_str().unwrap_or("?"),
        log["verdict"].as_str().unwrap_or("?"),
        log["bytes_up"],
        log["bytes_down"],
        log["duration_ms"].as_f64().unwrap_or_default()
    )
}
