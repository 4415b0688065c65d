#!/usr/bin/env python3
"""Probes for the containment tests (tests/containment.rs): sandboxed ones
try a way out of the sandbox other than a TCP connect or a DNS query and
print one JSON line with what happened; the others run outside it (a
packet capture and a recording DNS server in the test's network namespace).

usage: containment_probe.py PROBE ARGS...
Python 3.11 standard library only.
"""
import ctypes
import errno
import json
import os
import random
import select
import socket
import struct
import sys
import threading
import time

IPPROTO_UDPLITE = 136
IPPROTO_SCTP = 132
IPPROTO_MPTCP = 262
SO_BINDTOIFINDEX = 62  # asm-generic/socket.h; not in Python 3.11's socket module
PR_SET_NAME = 15
PAYLOAD = b"containment-probe"


def emit(**event):
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def error_name(error):
    return errno.errorcode.get(error.errno, str(error.errno)) if error.errno else type(error).__name__


def attempt(action):
    """Runs `action`; returns {"ok": its result} or {"error": errno name}."""
    try:
        return {"ok": action()}
    except socket.timeout:
        return {"error": "timeout"}
    except OSError as error:
        return {"error": error_name(error)}


def steps(*actions):
    """Runs (name, action) pairs until one fails: each outcome by name,
    the first failure last."""
    outcome = {}
    for name, action in actions:
        outcome[name] = attempt(action)
        if "error" in outcome[name]:
            break
    return outcome


def family_of(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET


# --- outside the sandbox, in the test's network namespace -------------------

# ICMPv6 that a link emits by itself: MLD (130-132, 143), router and
# neighbour discovery (133-137).
ICMPV6_LINK_NOISE = {130, 131, 132, 133, 134, 135, 136, 137, 143}


def parse_packet(frame, outgoing):
    """A summary of an IPv4/IPv6 frame, or None for anything else (ARP)."""
    ethertype = struct.unpack("!H", frame[12:14])[0]
    data = frame[14:]
    if ethertype == 0x0800 and len(data) >= 20:
        header_len = (data[0] & 0x0F) * 4
        proto = data[9]
        packet = {"v": 4, "proto": proto, "src": socket.inet_ntop(socket.AF_INET, data[12:16]),
                  "dst": socket.inet_ntop(socket.AF_INET, data[16:20])}
        body = data[header_len:struct.unpack("!H", data[2:4])[0]]
    elif ethertype == 0x86DD and len(data) >= 40:
        proto = data[6]
        packet = {"v": 6, "src": socket.inet_ntop(socket.AF_INET6, data[8:24]),
                  "dst": socket.inet_ntop(socket.AF_INET6, data[24:40])}
        body = data[40:40 + struct.unpack("!H", data[4:6])[0]]
        while proto in (0, 43, 60) and len(body) >= 8:  # hop-by-hop, routing, destination options
            proto, body = body[0], body[(body[1] + 1) * 8:]
        packet["proto"] = proto
        if proto == 58 and body and body[0] in ICMPV6_LINK_NOISE:
            return None
    else:
        return None
    packet["outgoing"] = outgoing
    if proto in (6, 17, IPPROTO_UDPLITE, IPPROTO_SCTP) and len(body) >= 4:
        packet["sport"], packet["dport"] = struct.unpack("!HH", body[:4])
    if proto == 6 and len(body) >= 20:
        flags = body[13]
        packet["flags"] = "".join(name for bit, name in ((2, "S"), (16, "A"), (1, "F"), (4, "R")) if flags & bit)
        packet["payload"] = len(body) - (body[12] >> 4) * 4
    elif proto in (17, IPPROTO_UDPLITE):
        packet["payload"] = len(body) - 8
    elif proto in (1, 58) and body:
        packet["icmp_type"] = body[0]
        packet["payload"] = len(body)
    return packet


def capture(interface):
    """Every IPv4/IPv6 packet on `interface` (but the link's own ICMPv6
    noise) until stdin closes; then one line with them all."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    sock.bind((interface, 0))
    sock.settimeout(0.05)
    stop = threading.Event()

    def wait_for_eof():
        sys.stdin.read()
        stop.set()
    threading.Thread(target=wait_for_eof, daemon=True).start()
    emit(kind="ready")
    packets = []
    quiet_since = None
    while True:
        try:
            frame, address = sock.recvfrom(65536)
        except socket.timeout:
            if stop.is_set():
                # Drain what is still on its way, then report.
                quiet_since = quiet_since or time.monotonic()
                if time.monotonic() - quiet_since > 0.3:
                    break
            continue
        quiet_since = None
        packet = parse_packet(frame, address[2] == socket.PACKET_OUTGOING)
        if packet:
            packets.append(packet)
    emit(kind="packets", packets=packets)


def encode_name(name):
    return b"".join(bytes([len(label)]) + label.encode() for label in name.rstrip(".").split(".")) + b"\0"


def decode_name(message, offset):
    labels = []
    while True:
        length = message[offset]
        if length & 0xC0 == 0xC0:
            pointer = struct.unpack("!H", message[offset:offset + 2])[0] & 0x3FFF
            labels.append(decode_name(message, pointer)[0])
            return ".".join(labels), offset + 2
        offset += 1
        if length == 0:
            return ".".join(labels), offset
        labels.append(message[offset:offset + length].decode(errors="replace"))
        offset += length


def dns_query(query_id, name, qtype=1):
    return struct.pack("!HHHHHH", query_id, 0x0100, 1, 0, 0, 0) + encode_name(name) + struct.pack("!HH", qtype, 1)


def dns_server(address, slow_suffix, delay, *records):
    """A DNS server that prints every query it receives. NAME=IP records are
    answered at once, names under `slow_suffix` with 198.18.0.0 after `delay`
    seconds, anything else NXDOMAIN."""
    known = dict(record.split("=", 1) for record in records)
    sock = socket.socket(family_of(address), socket.SOCK_DGRAM)
    sock.bind((address, 53))
    lock = threading.Lock()

    def answer(query, peer, name, qtype, ip):
        question_end = 12 + len(encode_name(name)) + 4 if name else len(query)
        if ip and qtype == 1:
            header = struct.pack("!HHHHHH", struct.unpack("!H", query[:2])[0], 0x8180, 1, 1, 0, 0)
            record = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + socket.inet_aton(ip)
            reply = header + query[12:question_end] + record
        else:
            rcode = 0 if ip else 3
            header = struct.pack("!HHHHHH", struct.unpack("!H", query[:2])[0], 0x8180 | rcode, 1, 0, 0, 0)
            reply = header + query[12:question_end]
        with lock:
            try:
                sock.sendto(reply, peer)
            except OSError:  # late timers once the test tears the network down
                pass
    emit(kind="ready")
    while True:
        query, peer = sock.recvfrom(4096)
        try:
            name, offset = decode_name(query, 12)
            qtype = struct.unpack("!H", query[offset:offset + 2])[0]
        except (IndexError, struct.error):
            emit(kind="query", name=None, qtype=None)
            continue
        emit(kind="query", name=name.lower(), qtype=qtype)
        if name.lower().endswith(slow_suffix):
            threading.Timer(float(delay), answer, (query, peer, name, qtype, "198.18.0.0")).start()
        else:
            answer(query, peer, name, qtype, known.get(name.lower()))


# --- inside the sandbox, as a user other than root ---------------------------

def icmp_echo(host4, host6):
    """Unprivileged ping sockets: an echo request with a payload, sent with
    sendto() (no connect)."""
    def ping(family, proto, echo_type, host):
        sock = None

        def make():
            nonlocal sock
            sock = socket.socket(family, socket.SOCK_DGRAM, proto)
            sock.settimeout(1)
            return True

        def send():
            return sock.sendto(struct.pack("!BBHHH", echo_type, 0, 0, 0, 1) + PAYLOAD, (host, 0))

        def reply():
            return len(sock.recv(1024))
        outcome = steps(("socket", make), ("sendto", send), ("reply", reply))
        if sock:
            sock.close()
        return outcome
    return {"icmp4": ping(socket.AF_INET, socket.IPPROTO_ICMP, 8, host4),
            "icmp6": ping(socket.AF_INET6, socket.IPPROTO_ICMPV6, 128, host6)}


def other_protocols(host4, host6, port):
    """UDP-Lite (connect then send, and sendto), SCTP and MPTCP."""
    port = int(port)
    sockets = []

    def make(family, kind, proto):
        def action():
            sock = socket.socket(family, kind, proto)
            sock.settimeout(2)
            sockets.append(sock)
            return True
        return action

    def last():
        return sockets[-1]
    outcome = {}
    for name, family, host in (("udplite4", socket.AF_INET, host4), ("udplite6", socket.AF_INET6, host6)):
        outcome[name] = steps(("socket", make(family, socket.SOCK_DGRAM, IPPROTO_UDPLITE)),
                              ("connect", lambda: last().connect((host, port)) or True),
                              ("send", lambda: last().send(PAYLOAD)))
        outcome[name + "_sendto"] = steps(("socket", make(family, socket.SOCK_DGRAM, IPPROTO_UDPLITE)),
                                          ("sendto", lambda: last().sendto(PAYLOAD, (host, port))))
    for name, proto in (("sctp", IPPROTO_SCTP), ("mptcp", IPPROTO_MPTCP)):
        outcome[name] = steps(("socket", make(socket.AF_INET, socket.SOCK_STREAM, proto)),
                              ("connect", lambda: last().connect((host4, port)) or True),
                              ("send", lambda: last().send(PAYLOAD)))
    for sock in sockets:
        sock.close()
    return outcome


def bind_device(interface, host, tcp_port):
    """SO_BINDTODEVICE / SO_BINDTOIFINDEX on the host side of the test's
    veth, then a DNS datagram and a TCP connect to the test host."""
    ifindex = socket.if_nametoindex(interface)
    options = {
        "bindtodevice": (socket.SO_BINDTODEVICE, interface.encode()),
        "bindtoifindex": (SO_BINDTOIFINDEX, struct.pack("i", ifindex)),
    }
    outcome = {}
    for option_name, (option, value) in options.items():
        for kind in ("udp", "tcp"):
            with socket.socket(family_of(host), socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM) as sock:
                sock.settimeout(2)
                if kind == "udp":
                    use = ("sendto", lambda: sock.sendto(dns_query(0x5e5e, "bound.test"), (host, 53)))
                else:
                    use = ("connect", lambda: sock.connect((host, int(tcp_port))) or sock.send(PAYLOAD))
                outcome[f"{option_name}_{kind}"] = steps(
                    ("setsockopt", lambda: sock.setsockopt(socket.SOL_SOCKET, option, value) or True), use)
    return outcome


def unix_sockets(stream_name, dgram_name, path):
    """Abstract names (a leading NUL) and a path-based socket."""
    def stream(address):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(2)
            sock.connect(address)
            return sock.send(PAYLOAD)

    def dgram(address):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            return sock.sendto(PAYLOAD, address)
    outcome = {}
    if stream_name != "-":
        outcome["abstract_stream"] = attempt(lambda: stream("\0" + stream_name))
    if dgram_name != "-":
        outcome["abstract_dgram"] = attempt(lambda: dgram("\0" + dgram_name))
    if path != "-":
        outcome["path_stream"] = attempt(lambda: stream(path))
    return outcome


def listen(port):
    """Listens on every address, TCP and UDP, IPv4 and IPv6; says so, waits
    for a line on stdin, then reports what arrived."""
    port = int(port)
    listeners = {}
    for name, family, kind, address in (
        ("tcp4", socket.AF_INET, socket.SOCK_STREAM, "0.0.0.0"),
        ("tcp6", socket.AF_INET6, socket.SOCK_STREAM, "::"),
        ("udp4", socket.AF_INET, socket.SOCK_DGRAM, "0.0.0.0"),
        ("udp6", socket.AF_INET6, socket.SOCK_DGRAM, "::"),
    ):
        sock = socket.socket(family, kind)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)

        def bind(sock=sock, address=address, kind=kind):
            sock.bind((address, port))
            if kind == socket.SOCK_STREAM:
                sock.listen(16)
            sock.setblocking(False)
            return True
        listeners[name] = (sock, attempt(bind))
    emit(kind="listening", **{name: outcome for name, (_, outcome) in listeners.items()})
    sys.stdin.readline()
    report = {}
    for name, (sock, outcome) in listeners.items():
        received = 0
        if "ok" in outcome:
            while True:
                try:
                    if name.startswith("tcp"):
                        sock.accept()[0].close()
                    else:
                        sock.recvfrom(65536)
                    received += 1
                except (BlockingIOError, OSError):
                    break
        report[name] = received
    emit(kind="report", received=report)


def loopback_server(port):
    """A server on 127.0.0.1: answers one connection's first bytes with
    "pong"; reports whether it was reached."""
    server = socket.create_server(("127.0.0.1", int(port)))
    server.settimeout(15)
    emit(kind="listening")
    try:
        conn, _ = server.accept()
    except socket.timeout:
        emit(kind="report", reached=False)
        return
    with conn:
        conn.settimeout(5)
        data = conn.recv(100)
        conn.sendall(b"pong")
    emit(kind="report", reached=True, received=data.decode(errors="replace"))


def loopback_client(port):
    """Opaque TCP to a sandboxed server on loopback."""
    def run():
        with socket.create_connection(("127.0.0.1", int(port)), timeout=5) as sock:
            sock.sendall(b"\0ping")
            return sock.recv(100).decode(errors="replace")
    return attempt(run)


def exchange_on(sock):
    """A small exchange with servers.py's exchange server."""
    sock.sendall(b"SEND 0 RECV 10\n")
    data = b""
    while chunk := sock.recv(100):
        data += chunk
    return len(data)


def wait_for_exe(pid, exe):
    """Waits (bounded) until process `pid` runs `exe`."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if os.readlink(f"/proc/{pid}/exe") == exe:
                return True
        except OSError:
            pass
        time.sleep(0.001)
    return False


def fork_then_exec(host, port, curl):
    """The parent execs curl (blocked reading its config from stdin) after
    forking; the child, still python, then connects to a host that only
    curl may reach. The child prints the result."""
    read_end, write_end = os.pipe()
    parent = os.getpid()
    if os.fork() == 0:
        os.close(read_end)
        outcome = {"child_pid": os.getpid(), "parent_was_curl": wait_for_exe(parent, curl)}
        with socket.socket(family_of(host), socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            outcome["exchange"] = attempt(lambda: sock.connect((host, int(port))) or exchange_on(sock))
        emit(**outcome)
        os.close(write_end)  # curl reads EOF and exits
        os._exit(0)
    os.close(write_end)
    os.dup2(read_end, 0)
    os.execv(curl, [curl, "-sS", "-K", "-"])


def connect_then_exec(host, port, curl):
    """A socket made before a fork is connected by the parent, which at
    once execs curl keeping it open; the child (python) then runs an
    exchange over the same socket. The connect was the parent's."""
    sock = socket.socket(family_of(host), socket.SOCK_STREAM)
    read_end, write_end = os.pipe()
    parent = os.getpid()
    if os.fork() == 0:
        os.close(read_end)
        # Once the parent is curl (its connect done before), use its socket.
        outcome = {"parent_pid": parent, "parent_was_curl": wait_for_exe(parent, curl)}
        sock.settimeout(5)
        select.select([], [sock], [], 5)
        outcome["exchange"] = attempt(lambda: exchange_on(sock))
        emit(**outcome)
        os.close(write_end)
        os._exit(0)
    os.close(write_end)
    sock.setblocking(False)
    try:
        sock.connect((host, int(port)))
    except BlockingIOError:
        pass
    os.set_inheritable(sock.fileno(), True)
    os.dup2(read_end, 0)
    os.execv(curl, [curl, "-sS", "-K", "-"])


def forge(count, host, port):
    """Names itself "x\\nFORGED..." and makes `count` connects (in a network
    namespace other than the agent's, every one is refused)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_NAME, ctypes.c_char_p(b"x\nFORGED line"), 0, 0, 0)
    errors = {}
    for _ in range(int(count)):
        with socket.socket(family_of(host), socket.SOCK_STREAM) as sock:
            sock.settimeout(1)
            outcome = attempt(lambda: sock.connect((host, int(port))) or True)
        key = outcome.get("error", "connected")
        errors[key] = errors.get(key, 0) + 1
    with open("/proc/self/comm") as comm:
        return {"pid": os.getpid(), "comm": comm.read().rstrip("\n"), "outcomes": errors}


def collect_replies(sock, pending, timeout):
    """Reads replies to the query ids in `pending` (id -> key) for up to
    `timeout` seconds; returns key -> rcode."""
    rcodes = {}
    deadline = time.monotonic() + timeout
    while pending.keys() - rcodes.keys() and time.monotonic() < deadline:
        ready, _, _ = select.select([sock], [], [], max(0, deadline - time.monotonic()))
        if not ready:
            break
        reply = sock.recv(4096)
        if len(reply) >= 12:
            query_id, flags, _, answers = struct.unpack("!HHHH", reply[:8])
            if query_id in pending:
                rcodes[query_id] = {"rcode": flags & 0xF, "answers": answers}
    return {pending[query_id]: outcome for query_id, outcome in rcodes.items()}


def dns_tunnel(server, domain, count, listed_name):
    """Queries for `count` unique random names under `domain`, TXT and NULL
    queries for `listed_name`, then, once the rate budget refilled, an A
    query for it."""
    sock = socket.socket(family_of(server), socket.SOCK_DGRAM)
    pending = {}
    names = [f"{random.getrandbits(64):016x}.{domain}" for _ in range(int(count))]
    for number, name in enumerate(names):
        pending[number + 1] = name
        sock.sendto(dns_query(number + 1, name), (server, 53))
        if number % 50 == 49:
            time.sleep(0.01)  # pace: a burst is not the point here
    tunnel = collect_replies(sock, pending, 5)
    rcodes = {}
    for outcome in tunnel.values():
        rcodes[str(outcome["rcode"])] = rcodes.get(str(outcome["rcode"]), 0) + 1
    pending = {60001: "TXT", 60002: "NULL"}
    sock.sendto(dns_query(60001, listed_name, 16), (server, 53))
    sock.sendto(dns_query(60002, listed_name, 10), (server, 53))
    other_types = collect_replies(sock, pending, 3)
    # The tunnel spent this sandbox's query budget (100 a second by
    # default): a lookup after it has refilled must be answered as before.
    time.sleep(1.1)
    sock.sendto(dns_query(60003, listed_name, 1), (server, 53))
    a = collect_replies(sock, {60003: "A"}, 3)
    return {"names": names, "answered": len(tunnel), "rcodes": rcodes, "other_types": other_types,
            "a": a.get("A")}


def dns_flood(server, suffix, limit):
    """Queries for unique names under `suffix` as fast as replies allow,
    until stdin closes or `limit` queries; says "flooding" after 300."""
    sock = socket.socket(family_of(server), socket.SOCK_DGRAM)
    sock.setblocking(False)
    stop = threading.Event()

    def wait_for_eof():
        sys.stdin.read()
        stop.set()
    threading.Thread(target=wait_for_eof, daemon=True).start()
    sent = 0
    deadline = time.monotonic() + 30
    while not stop.is_set() and sent < int(limit) and time.monotonic() < deadline:
        try:
            sock.sendto(dns_query(sent & 0xFFFF, f"{random.getrandbits(48):012x}.{suffix}"), (server, 53))
            sent += 1
        except BlockingIOError:
            pass
        try:
            while sock.recv(4096):
                pass
        except BlockingIOError:
            pass
        if sent == 300:
            emit(kind="flooding")
        if sent % 4 == 0:
            time.sleep(0.001)  # about 3,000 queries a second
    emit(kind="done", sent=sent)


def dns_resolve(server, *names):
    """An A query for each name, as a resolver would: three tries, 1 s each."""
    sock = socket.socket(family_of(server), socket.SOCK_DGRAM)
    answers = {}
    for number, name in enumerate(names):
        for attempt_number in range(3):
            query_id = number * 4 + attempt_number + 1
            sock.sendto(dns_query(query_id, name), (server, 53))
            reply = collect_replies(sock, {query_id: name}, 1)
            if name in reply:
                answers[name] = reply[name]
                break
    return {"answered": sum(1 for outcome in answers.values() if outcome["answers"] > 0), "answers": answers}


PROBES = {
    "icmp": icmp_echo,
    "protocols": other_protocols,
    "bind-device": bind_device,
    "unix": unix_sockets,
    "loopback-client": loopback_client,
    "fork-then-exec": fork_then_exec,
    "connect-then-exec": connect_then_exec,
    "forge": forge,
    "dns-tunnel": dns_tunnel,
    "dns-resolve": dns_resolve,
}
# Probes that print their own lines.
SERVERS = {
    "capture": capture,
    "dns-server": dns_server,
    "listen": listen,
    "loopback-server": loopback_server,
    "dns-flood": dns_flood,
}

if __name__ == "__main__":
    probe = sys.argv[1]
    if probe in SERVERS:
        SERVERS[probe](*sys.argv[2:])
    elif probe in ("fork-then-exec", "connect-then-exec"):
        PROBES[probe](*sys.argv[2:])
    else:
        emit(**PROBES[probe](*sys.argv[2:]))
