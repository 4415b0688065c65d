#!/usr/bin/env python3
"""A fake inference provider (OpenAI- and Anthropic-style), run in a test
network namespace, over plain HTTP and TLS. Every request prints one JSON line
with what arrived (method, path, headers, body), so tests can check what the
agent injected and rewrote."""
import argparse
import http.server
import json
import socket
import ssl
import sys
import threading
import time


def emit(**event):
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


class Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


class Provider(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def record(self, body):
        emit(kind="request", method=self.command, path=self.path,
             headers={k.lower(): v for k, v in self.headers.items()}, body=body)

    def send_json(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.record(None)
        if self.path == "/v1/models":
            self.send_json(200, {"object": "list", "data": [{"id": "served-model"}]})
        else:
            self.send_json(404, {"error": "not found"})

    def do_POST(self):
        length = int(self.headers.get("Content-Length", "0"))
        body = json.loads(self.rfile.read(length) or b"null")
        self.record(body)
        if self.path == "/v1/chat/completions" and body.get("stream"):
            self.stream_events(body["model"])
        elif self.path == "/v1/chat/completions":
            self.send_json(200, {"object": "chat.completion", "model": body["model"],
                                 "choices": [{"message": {"role": "assistant", "content": "hi"}}]})
        elif self.path == "/v1/messages":
            self.send_json(200, {"type": "message", "model": body["model"], "content": [{"type": "text", "text": "hi"}]})
        else:
            self.send_json(404, {"error": "not found"})

    def stream_events(self, model):
        """Server-sent events, chunked, with pauses: the client must see each
        event as it is sent, not at the end."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for i in range(3):
            event = f"data: {json.dumps({'model': model, 'index': i})}\n\n".encode()
            self.wfile.write(f"{len(event):x}\r\n".encode() + event + b"\r\n")
            self.wfile.flush()
            time.sleep(0.2)
        done = b"data: [DONE]\n\n"
        self.wfile.write(f"{len(done):x}\r\n".encode() + done + b"\r\n0\r\n\r\n")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--tls-port", type=int, required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    args = parser.parse_args()
    tls = Server(("::", args.tls_port), Provider)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(args.cert, args.key)
    tls.socket = context.wrap_socket(tls.socket, server_side=True)
    for server in [Server(("::", args.http_port), Provider), tls]:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    emit(kind="ready")
    threading.Event().wait()


if __name__ == "__main__":
    main()
