//! `cargo xtask demo`: the agent's main job on a demo sandbox, narrated.
//! A "remote" server runs in a network namespace; programs started in a
//! sandbox by `sandbox-egress exec` know nothing about proxies, yet every
//! connect goes through the agent.

use anyhow::{ensure, Result};
use std::process::Output;

use e2e::{
    curl, spawn_and_wait, support_file, url_host, AgentDaemon, PolicyFile, Sandbox, TestNet, EXCHANGE_PORT, HTTP_PORT,
    PYTHON,
};
use serde_json::Value;

pub fn run() -> Result<()> {
    crate::require_root("demo")?;
    crate::setup::run()?;
    let agent_bin = crate::build_agent(false)?;
    std::env::set_var("SANDBOX_EGRESS_BIN", &agent_bin);

    let net = TestNet::new()?;
    let _servers = net.start_servers()?;
    let web = Sandbox::new("demo-web")?;
    let ops = Sandbox::new("demo-ops")?;
    let web_policy = PolicyFile::new(&net.allow_all_policy())?;
    // ops may only reach the exchange port: the same HTTP request is denied there.
    let ops_policy = PolicyFile::new(&format!(
        "version: 1\nnetwork_policies:\n  exchange-only:\n    binaries: [{{ path: \"/**\" }}]\n    endpoints:\n      - host: \"{}\"\n        port: {EXCHANGE_PORT}\n        allowed_ips: [\"{}/24\"]\n",
        net.private_v4, net.private_v4
    ))?;
    step(&format!(
        "remote server at {} and {} (private), {} (public), in network namespace {}",
        net.private_v4, net.private_v6, net.v4, net.netns
    ));
    step(&format!("starting one daemon for every sandbox: {} run --metrics-listen 127.0.0.1:0", agent_bin.display()));
    let mut daemon = AgentDaemon::start(&["--metrics-listen", "127.0.0.1:0"])?;
    let metrics = daemon.agent.log.wait_for("metrics", |e| e["event"] == "metrics_listening")?["address"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    for (name, sandbox, policy) in [("web", &web, &web_policy), ("ops", &ops, &ops_policy)] {
        step(&format!(
            "sandbox-egress sandbox add {name} --cgroup {} --policy {}",
            sandbox.path_str(),
            policy.path.display()
        ));
        println!("{}", indent(&std::fs::read_to_string(&policy.path)?));
        let added = daemon.add(name, sandbox, policy, &[])?;
        println!("    agent: sandbox {name} listening on port {}", added["listen_port"]);
    }

    for ip in [url_host(net.private_v4.into()), url_host(net.private_v6.into())] {
        let url = format!("http://{ip}:{HTTP_PORT}/bytes/1048576");
        step(&format!("sandbox-egress exec --sandbox web --user nobody -- curl {url} (no proxy variables)"));
        let (pid, output) = exec_curl(&daemon, "web", &url)?;
        println!("    curl: {}", describe_curl(&output));
        println!("    agent: {}", describe_connection(&daemon.agent.wait_connection_of(pid)?));
    }
    let url = format!("http://{}:{HTTP_PORT}/bytes/10", net.private_v4);
    step(&format!("in ops, whose policy differs: the same curl {url}"));
    let (pid, output) = exec(&daemon, "ops", "curl", &["-sS", "-m", "10", &url])?;
    println!("    curl: {}", String::from_utf8_lossy(&output.stdout).trim());
    println!("    agent: {}", describe_connection(&daemon.agent.wait_connection_of(pid)?));
    step(&format!("in ops: a raw TCP exchange with {}:{EXCHANGE_PORT}, which its policy allows", net.private_v4));
    let (pid, output) = exec_exchange(&daemon, "ops", "inet", &net.private_v4.to_string())?;
    println!("    client: {}", String::from_utf8_lossy(&output.stdout).trim());
    println!("    agent: {}", describe_connection(&daemon.agent.wait_connection_of(pid)?));

    let mapped = format!("::ffff:{}", net.v4);
    step(&format!("in web: raw TCP client on an AF_INET6 socket to {mapped} (v4-mapped)"));
    let (pid, output) = exec_exchange(&daemon, "web", "inet6", &mapped)?;
    println!("    client: {}", String::from_utf8_lossy(&output.stdout).trim());
    println!("    agent: {}", describe_connection(&daemon.agent.wait_connection_of(pid)?));

    let url = format!("http://{}:{HTTP_PORT}/bytes/10", net.v4);
    step(&format!("in web: plain HTTP to a public address is refused: curl {url}"));
    let (pid, output) = exec(&daemon, "web", "curl", &["-sS", "-m", "10", &url])?;
    println!("    curl: {}", String::from_utf8_lossy(&output.stdout).trim());
    println!("    agent: {}", describe_connection(&daemon.agent.wait_connection_of(pid)?));

    step("the same curl from outside any sandbox is not intercepted");
    let (pid, output) = curl(None, &format!("http://{}:{HTTP_PORT}/bytes/10", net.v4))?;
    println!("    curl: {}", describe_curl(&output));
    ensure!(daemon.agent.connections_of(pid).is_empty(), "a process outside the sandbox was intercepted");
    println!("    agent: no record of pid {pid}");

    let probe = "import socket\ntry:\n    socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)\n    print('vsock socket created')\nexcept OSError as e:\n    print('vsock socket refused:', e)";
    step("in web: a vsock socket (to the VM's host; no cgroup hook sees it) is refused by exec's seccomp filter");
    let (_, output) = exec(&daemon, "web", PYTHON, &["-c", probe])?;
    println!("    python: {}", String::from_utf8_lossy(&output.stdout).trim());

    step("sandbox-egress status");
    let (_, status, _) = daemon.cli(&["status"])?;
    println!("{}", indent(&status));
    step(&format!("curl http://{metrics}/metrics (connections by sandbox)"));
    let scraped = std::process::Command::new("curl").args(["-sS", &format!("http://{metrics}/metrics")]).output()?;
    let text = String::from_utf8_lossy(&scraped.stdout);
    let lines: Vec<&str> = text.lines().filter(|line| line.starts_with("sandbox_egress_connections_total")).collect();
    println!("{}", indent(&lines.join("\n")));

    step("SIGKILL the daemon: every sandbox fails closed (a program already in it, started by exec before)");
    let url = format!("http://{}:{HTTP_PORT}/bytes/10", net.private_v4);
    let script =
        format!("read _; exec curl -sS --noproxy '*' -m 10 -o /dev/null -w '%{{http_code}} %{{size_download}}' {url}");
    let mut waiting = daemon
        .exec("web", &["--user", "nobody"], "sh", &["-c", &script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    // exec has joined the cgroup once sh runs in it (its pid is sh's).
    let procs = web.path.join("cgroup.procs");
    let deadline = std::time::Instant::now() + e2e::WAIT;
    while !std::fs::read_to_string(&procs)?.lines().any(|pid| pid == waiting.id().to_string()) {
        ensure!(std::time::Instant::now() < deadline, "exec did not start in the sandbox");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    daemon.agent.kill();
    drop(waiting.stdin.take());
    let output = waiting.wait_with_output()?;
    println!("    curl: {}", describe_curl(&output));
    ensure!(!output.status.success(), "the sandbox reached the server with the agent dead");

    step("restart the daemon and add web again: it replaces the pinned links and interception resumes");
    let mut daemon = AgentDaemon::start(&[])?;
    daemon.add("web", &web, &web_policy, &[])?;
    daemon.detach_on_drop(ops.path_str());
    let (pid, output) = exec_curl(&daemon, "web", &format!("http://{}:{HTTP_PORT}/bytes/10", net.private_v4))?;
    println!("    curl: {}", describe_curl(&output));
    println!("    agent: {}", describe_connection(&daemon.agent.wait_connection_of(pid)?));

    step("stop the daemon and detach the sandboxes; remove the namespace and cgroups");
    drop(daemon);
    println!("\ndemo complete");
    Ok(())
}

/// `sandbox-egress exec --sandbox SANDBOX --user nobody -- PROGRAM ARGS`:
/// (pid, output); the pid is the program's (exec replaces itself with it).
fn exec(daemon: &AgentDaemon, sandbox: &str, program: &str, args: &[&str]) -> Result<(u32, Output)> {
    spawn_and_wait(daemon.exec(sandbox, &["--user", "nobody"], program, args))
}

/// curl printing "status size_download" as [`describe_curl`] reads it.
fn exec_curl(daemon: &AgentDaemon, sandbox: &str, url: &str) -> Result<(u32, Output)> {
    let format = "%{http_code} %{size_download}";
    exec(daemon, sandbox, "curl", &["-sS", "--noproxy", "*", "-m", "10", "-o", "/dev/null", "-w", format, url])
}

/// The raw TCP exchange client (64 KiB each way) on a socket of `family`.
fn exec_exchange(daemon: &AgentDaemon, sandbox: &str, family: &str, host: &str) -> Result<(u32, Output)> {
    let client = support_file("exchange_client.py");
    let port = EXCHANGE_PORT.to_string();
    exec(daemon, sandbox, PYTHON, &[client.to_str().unwrap(), family, host, &port, "65536", "65536"])
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
        "[{}] pid {} {} -> {} {} {}{reason} ({} B up, {} B down, {:.1} ms)",
        log["sandbox"].as_str().unwrap_or("?"),
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
