#!/usr/bin/env python3
"""A server that reports every connection it accepts, run inside a test
network namespace: for tests of what a server sees of streams the agent
denies (nothing) or allows (every byte).

Each of --ports listens on IPv4 and IPv6. On accept it prints
{"kind": "accepted", "port", "peer"}; it then reads until the peer closes
or resets and prints {"kind": "closed", "port", "peer", "received": bytes,
"sha256": hex digest of them, "how": "eof" | "reset"}. On --greeting-ports it first says a greeting
line, as an SMTP server does; on --http-ports it answers a request head
with a 200 and closes.
"""
import argparse
import hashlib
import json
import socket
import sys
import threading

GREETING = b"220 accept-counter ready\r\n"
HTTP_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


def emit(**event):
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def serve_connection(connection, peer, port, greet, http):
    digest = hashlib.sha256()
    head = b""
    received = 0
    how = "eof"
    with connection:
        try:
            if greet:
                connection.sendall(GREETING)
            while True:
                data = connection.recv(65536)
                if not data:
                    break
                received += len(data)
                digest.update(data)
                head += data
                if http and b"\r\n\r\n" in head:
                    connection.sendall(HTTP_OK)
                    break
        except ConnectionResetError:
            how = "reset"
    emit(kind="closed", port=port, peer=peer, received=received, sha256=digest.hexdigest(), how=how)


def accept_loop(listener, port, greet, http):
    while True:
        connection, address = listener.accept()
        peer = address[0]
        emit(kind="accepted", port=port, peer=peer)
        threading.Thread(target=serve_connection, args=(connection, peer, port, greet, http), daemon=True).start()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ports", required=True, help="comma-separated")
    parser.add_argument("--greeting-ports", default="", help="comma-separated, among --ports")
    parser.add_argument("--http-ports", default="", help="comma-separated, among --ports")
    args = parser.parse_args()
    greeting = {int(p) for p in args.greeting_ports.split(",") if p}
    http = {int(p) for p in args.http_ports.split(",") if p}
    threads = []
    for port in (int(p) for p in args.ports.split(",")):
        listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        listener.bind(("::", port))
        listener.listen(128)
        thread = threading.Thread(target=accept_loop, args=(listener, port, port in greeting, port in http), daemon=True)
        thread.start()
        threads.append(thread)
    emit(kind="ready")
    for thread in threads:
        thread.join()


if __name__ == "__main__":
    main()
