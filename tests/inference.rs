//! inference.local end to end: the sandbox's DNS answered by the agent, and
//! the managed inference route.

use anyhow::{ensure, Result};
use e2e::*;

/// A raw DNS exchange from Python inside the sandbox: `transport` udp or tcp,
/// to `server` (any address: the agent answers). Prints the reply's source
/// address (udp) and the address of the first A answer.
const DNS_CLIENT: &str = r#"
import socket, struct, sys
transport, server, name = sys.argv[1], sys.argv[2], sys.argv[3]
query = struct.pack('>HHHHHH', 0x5e5e, 0x0100, 1, 0, 0, 0)
query += b''.join(bytes([len(label)]) + label.encode() for label in name.split('.')) + b'\x00' + struct.pack('>HH', 1, 1)
if transport == 'udp':
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(5)
    s.sendto(query, (server, 53))
    reply, source = s.recvfrom(4096)
    print(f'{source[0]}:{source[1]}')
else:
    s = socket.create_connection((server, 53), timeout=5)
    s.sendall(struct.pack('>H', len(query)) + query)
    length = struct.unpack('>H', s.recv(2))[0]
    reply = b''
    while len(reply) < length:
        reply += s.recv(length - len(reply))
    print('tcp')
assert reply[:2] == b'\x5e\x5e', 'id differs'
print(socket.inet_ntoa(reply[-4:]))
"#;

#[test]
fn the_sandboxes_dns_is_answered_by_the_agent() -> Result<()> {
    require_root();
    let net = TestNet::new()?;
    let dns = net.start_dns(&[("allowed.test", net.private_v4.into())])?;
    let sandbox = Sandbox::new("dns")?;
    let policy = PolicyFile::new("version: 1\nnetwork_policies: {}\n")?;
    let dns_args = dns.agent_args();
    let _agent = Agent::start(&sandbox, &policy, &[dns_args[0].as_str(), dns_args[1].as_str()])?;

    // glibc's resolver, through /etc/resolv.conf, whatever server it names.
    for (name, expected) in [("inference.local", "240.0.0.1".to_owned()), ("allowed.test", net.private_v4.to_string())] {
        let (_, output) = run_in(&sandbox, "getent", &["ahostsv4", name])?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        ensure!(stdout.starts_with(&format!("{expected} ")), "getent ahostsv4 {name}: {stdout}{}", String::from_utf8_lossy(&output.stderr));
    }
    let (_, output) = run_in(&sandbox, "getent", &["ahostsv6", "inference.local"])?;
    assert!(String::from_utf8_lossy(&output.stdout).starts_with("100::1 "), "{}", String::from_utf8_lossy(&output.stdout));

    // Any resolver address (one in the blackholed test range, so nothing
    // could leave the machine if interception failed); the reply appears to
    // come from the server the program asked.
    let server = format!("198.18.{}.53", net.v4.octets()[2]);
    let (_, output) = run_in(&sandbox, PYTHON, &["-c", DNS_CLIENT, "udp", &server, "inference.local"])?;
    ensure!(output.status.success(), "udp query: {}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(String::from_utf8_lossy(&output.stdout), format!("{server}:53\n240.0.0.1\n"));

    let (_, output) = run_in(&sandbox, PYTHON, &["-c", DNS_CLIENT, "tcp", &server, "allowed.test"])?;
    ensure!(output.status.success(), "tcp query: {}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(String::from_utf8_lossy(&output.stdout), format!("tcp\n{}\n", net.private_v4));

    // Outside the sandbox nothing changes: the same UDP query gets no answer.
    let mut outside = std::process::Command::new(PYTHON);
    outside.args(["-c", DNS_CLIENT, "udp", &server, "inference.local"]);
    let output = outside.output()?;
    assert!(!output.status.success(), "a process outside the sandbox was answered by the agent");
    Ok(())
}
