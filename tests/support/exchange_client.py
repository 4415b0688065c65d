#!/usr/bin/env python3
"""Raw TCP client of the exchange server: knows nothing about proxies.

usage: exchange_client.py FAMILY HOST PORT SEND RECV
FAMILY is inet or inet6 (inet6 with a ::ffff:a.b.c.d host makes a v4-mapped
connect on a dual-stack socket). Prints one JSON line with what it sent and
received.
"""
import hashlib
import json
import socket
import sys

# The servers' own byte pattern, so what arrives can be checked.
from servers import CHUNK, pattern


def main():
    family, host, port, send, recv = sys.argv[1:6]
    send, recv = int(send), int(recv)
    sock = socket.socket(socket.AF_INET6 if family == "inet6" else socket.AF_INET, socket.SOCK_STREAM)
    if family == "inet6":
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.settimeout(30)
    sock.connect((host, int(port)))
    # A redirected connect is bound to the loopback; one let out by the kernel fast path is not.
    local = sock.getsockname()[0]
    sock.sendall(f"SEND {send} RECV {recv}\n".encode())
    sent_digest = hashlib.sha256()
    for piece in pattern(send):
        sent_digest.update(piece)
        sock.sendall(piece)
    received = 0
    expected = hashlib.sha256()
    for piece in pattern(recv):
        expected.update(piece)
    got = hashlib.sha256()
    while True:
        data = sock.recv(CHUNK)
        if not data:
            break
        got.update(data)
        received += len(data)
    print(json.dumps({
        "sent": send,
        "sent_sha256": sent_digest.hexdigest(),
        "received": received,
        "received_intact": got.hexdigest() == expected.hexdigest(),
        "local": local,
    }))


if __name__ == "__main__":
    main()
