#!/usr/bin/env python3
"""Sandboxed probes for the bypass matrix (tests/bypass.rs): each tries one
way around the agent and prints one JSON line with what happened.

usage: bypass_probe.py PROBE ARGS...
Exchanges speak the exchange server's protocol (servers.py) and check the
bytes that come back.
"""
import errno
import hashlib
import json
import os
import socket
import struct
import sys
import threading

from servers import CHUNK, pattern

SEND, RECV = 10_000, 20_000
TCP_FASTOPEN_CONNECT = 30  # linux/tcp.h; not in Python 3.11's socket module


def family_of(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def finish_exchange(sock, already_sent=b""):
    """Sends the rest of the exchange request and checks the answer."""
    request = f"SEND {SEND} RECV {RECV}\n".encode() + b"".join(pattern(SEND))
    sock.sendall(request[len(already_sent):])
    expected = hashlib.sha256(b"".join(pattern(RECV))).hexdigest()
    got, received = hashlib.sha256(), 0
    while data := sock.recv(CHUNK):
        got.update(data)
        received += len(data)
    return {"received": received, "intact": received == RECV and got.hexdigest() == expected}


def exchange(sock, address):
    sock.settimeout(10)
    sock.connect(address)
    return finish_exchange(sock)


def error_name(error):
    return errno.errorcode.get(error.errno, str(error.errno)) if error.errno else type(error).__name__


def attempt(action):
    """Runs `action`; returns its result or the errno name it failed with."""
    try:
        return {"ok": action()}
    except OSError as error:
        return {"error": error_name(error)}


def v6only(host6, mapped, port):
    """An IPV6_V6ONLY socket: native IPv6 is intercepted; a v4-mapped
    destination is refused by the kernel (such a socket cannot speak IPv4)."""
    def connect(host):
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        with sock:
            return exchange(sock, (host, int(port)))
    return {"v6": attempt(lambda: connect(host6)), "mapped": attempt(lambda: connect(mapped))}


def fast_open(host, port):
    """TCP Fast Open both ways a program can ask for it: sendto with
    MSG_FASTOPEN and no connect, and TCP_FASTOPEN_CONNECT before connect."""
    first = f"SEND {SEND} RECV {RECV}\n".encode()

    def sendto():
        with socket.socket(family_of(host), socket.SOCK_STREAM) as sock:
            # Blocking (bounded by SO_SNDTIMEO): without a cookie the kernel
            # completes the handshake before the data leaves.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 10, 0))
            sent = sock.sendto(first, socket.MSG_FASTOPEN, (host, int(port)))
            sock.settimeout(10)
            return finish_exchange(sock, first[:sent])

    def fastopen_connect():
        with socket.socket(family_of(host), socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_CONNECT, 1)
            return exchange(sock, (host, int(port)))
    return {"sendto": attempt(sendto), "fastopen_connect": attempt(fastopen_connect)}


def threads_and_child(host, port, count):
    """Connections from threads and from a forked child: the agent must
    attribute them to the process (tgid), not to the thread."""
    results, native_ids = [], []

    def worker():
        native_ids.append(threading.get_native_id())
        with socket.socket(family_of(host), socket.SOCK_STREAM) as sock:
            results.append(attempt(lambda: exchange(sock, (host, int(port)))))
    workers = [threading.Thread(target=worker) for _ in range(int(count))]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        with socket.socket(family_of(host), socket.SOCK_STREAM) as sock:
            outcome = attempt(lambda: exchange(sock, (host, int(port))))
        os.write(write_end, json.dumps(outcome).encode())
        os._exit(0)
    os.close(write_end)
    os.waitpid(child, 0)
    with os.fdopen(read_end) as pipe:
        child_result = json.load(pipe)
    return {"pid": os.getpid(), "thread_ids": native_ids, "threads": results, "child_pid": child, "child": child_result}


def joins_late(host, port, cgroup_procs):
    """A socket created before the process joined the sandbox cgroup keeps
    its original cgroup, so the sandbox's programs never see its connect."""
    early = socket.socket(family_of(host), socket.SOCK_STREAM)
    with open(cgroup_procs, "w") as procs:
        procs.write(str(os.getpid()))
    with early:
        before = attempt(lambda: exchange(early, (host, int(port))))
    with socket.socket(family_of(host), socket.SOCK_STREAM) as late:
        after = attempt(lambda: exchange(late, (host, int(port))))
    return {"pid": os.getpid(), "socket_from_before": before, "socket_from_after": after}


def other_netns(host, port, agent_port):
    """Run in a network namespace of its own (unshare -n, lo up) with a
    decoy listening where the agent's redirect would land: nothing may be
    redirected into the namespace, everything is refused."""
    decoy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    decoy.bind(("127.0.0.1", int(agent_port)))
    decoy.listen()
    decoy.setblocking(False)

    def tcp():
        with socket.socket(family_of(host), socket.SOCK_STREAM) as sock:
            return exchange(sock, (host, int(port)))

    def udp(udp_port):
        with socket.socket(family_of(host), socket.SOCK_DGRAM) as sock:
            return sock.sendto(b"\0" * 12, (host, udp_port))
    outcome = {"tcp": attempt(tcp), "dns": attempt(lambda: udp(53)), "udp_443": attempt(lambda: udp(443))}
    try:
        decoy.accept()
        outcome["decoy_accepted"] = True
    except BlockingIOError:
        outcome["decoy_accepted"] = False
    return outcome


def unix_connect(path):
    """The agent's control socket, from inside the sandbox."""
    def connect():
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(path)
            return True
    return attempt(connect)


def echo(host, port):
    """Sends bytes to an echo server, half-closes and reads them back."""
    def run():
        with socket.socket(family_of(host), socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect((host, int(port)))
            message = b"".join(pattern(SEND))
            sock.sendall(message)
            sock.shutdown(socket.SHUT_WR)
            back = b""
            while data := sock.recv(CHUNK):
                back += data
            return {"received": len(back), "intact": back == message}
    return attempt(run)


PROBES = {
    "v6only": v6only,
    "fast-open": fast_open,
    "threads-and-child": threads_and_child,
    "joins-late": joins_late,
    "other-netns": other_netns,
    "unix-connect": unix_connect,
    "echo": echo,
}

if __name__ == "__main__":
    print(json.dumps(PROBES[sys.argv[1]](*sys.argv[2:])), flush=True)
