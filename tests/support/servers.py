#!/usr/bin/env python3
"""Test "remote" servers, run inside a network namespace the test created.

HTTP (dual-stack): GET /bytes/N answers N pseudo-random bytes; the same
over TLS on --tls-port with the given certificate.
Exchange (dual-stack TCP): the client sends "SEND n RECV m\\n" and n bytes;
the server answers m bytes and closes.
Every request or exchange prints one JSON line on stdout, so tests can
assert what the server really saw.
"""
import argparse
import hashlib
import http.server
import json
import socket
import socketserver
import ssl
import sys
import threading

MAX_TRANSFER = 2 * 1024**3
CHUNK = 1 << 16


def emit(**event):
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def pattern(n):
    """Deterministic bytes, so clients can check what arrived."""
    block = hashlib.sha256(b"sandbox-egress").digest() * (CHUNK // 32)
    while n > 0:
        piece = block[: min(n, CHUNK)]
        n -= len(piece)
        yield piece


class DualStack:
    address_family = socket.AF_INET6
    allow_reuse_address = True
    daemon_threads = True
    # socketserver's default backlog of 5 overflows under concurrent clients
    # (tests/load.rs runs 64): the kernel then drops handshakes and resets.
    request_queue_size = 256

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def handle_error(self, request, client_address):
        """A connection that failed (say, the agent was killed mid-transfer):
        an event tests can count, instead of a traceback on stderr."""
        emit(kind="server_error", peer=client_address[0], error=repr(sys.exc_info()[1]))


class HttpServer(DualStack, http.server.ThreadingHTTPServer):
    pass


class HttpHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        parts = self.path.split("/")
        if len(parts) != 3 or parts[1] != "bytes" or not parts[2].isdigit() or int(parts[2]) > MAX_TRANSFER:
            self.send_error(404)
            emit(kind="http", peer=self.client_address[0], path=self.path, status=404)
            return
        n = int(parts[2])
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(n))
        self.end_headers()
        for piece in pattern(n):
            self.wfile.write(piece)
        emit(kind="http", peer=self.client_address[0], path=self.path, status=200,
             host=self.headers.get("Host"), user_agent=self.headers.get("User-Agent"), via=self.headers.get("Via"))

    def log_message(self, *args):
        pass


class ExchangeServer(DualStack, socketserver.ThreadingTCPServer):
    pass


class ExchangeHandler(socketserver.BaseRequestHandler):
    def handle(self):
        conn = self.request
        header = b""
        while not header.endswith(b"\n") and len(header) < 64:
            byte = conn.recv(1)
            if not byte:
                return
            header += byte
        _, send, _, recv = header.split()
        expect, answer = int(send), int(recv)
        digest = hashlib.sha256()
        received = 0
        while received < expect:
            data = conn.recv(min(CHUNK, expect - received))
            if not data:
                break
            digest.update(data)
            received += len(data)
        for piece in pattern(answer):
            conn.sendall(piece)
        conn.shutdown(socket.SHUT_WR)
        emit(kind="exchange", peer=self.client_address[0], received=received, sha256=digest.hexdigest(), sent=answer)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--exchange-port", type=int, required=True)
    parser.add_argument("--tls-port", type=int, required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    args = parser.parse_args()
    tls = HttpServer(("::", args.tls_port), HttpHandler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(args.cert, args.key)
    tls.socket = context.wrap_socket(tls.socket, server_side=True)
    servers = [
        HttpServer(("::", args.http_port), HttpHandler),
        ExchangeServer(("::", args.exchange_port), ExchangeHandler),
        tls,
    ]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    emit(kind="ready")
    threading.Event().wait()


if __name__ == "__main__":
    main()
