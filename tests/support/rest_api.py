#!/usr/bin/env python3
"""A fake REST API, run in a test network namespace, over plain HTTP and TLS
(the origin of TLS-terminated endpoints).

Every request, whatever its method and path, is answered 200 with a JSON
body and printed as one JSON line on stdout, both holding what arrived:
method, target (the raw request target), path and query (its two parts,
raw; query is null without "?"), headers (lower-cased names; repeated ones
joined with ", "), header_list (the [name, value] pairs in order) and body
(text), so tests can assert exactly what reached the origin, and that a
denied request never did. HTTP/1.1 keep-alive works.

A WebSocket upgrade on a path starting with /ws is answered 101; each
message is then echoed back and printed ({"kind": "ws_message", ...}).
"""
import argparse
import base64
import hashlib
import http.server
import json
import socket
import ssl
import struct
import sys
import threading

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_BODY = 16 << 20


def emit(**event):
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


class Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, address, handler, context=None):
        self.context = context
        self.scheme = "https" if context else "http"
        super().__init__(address, handler)

    def get_request(self):
        # The TLS handshake happens in the connection's own thread (setup):
        # a client that never sends its ClientHello must not stop accept.
        sock, address = self.socket.accept()
        if self.context:
            sock = self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def handle_error(self, request, client_address):
        emit(kind="server_error", peer=client_address[0], error=repr(sys.exc_info()[1]))


class RestApi(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def setup(self):
        if isinstance(self.request, ssl.SSLSocket):
            self.request.do_handshake()
        super().setup()

    def __getattr__(self, name):
        # Every method (do_GET, do_PATCH, do_FOO...) gets the same answer.
        if name.startswith("do_"):
            return self.answer
        raise AttributeError(name)

    def read_body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            body = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    break
                body += self.rfile.read(size)
                self.rfile.readline()
                if len(body) > MAX_BODY:
                    raise ValueError("body too large")
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return body
        length = int(self.headers.get("Content-Length", "0"))
        if length > MAX_BODY:
            raise ValueError("body too large")
        return self.rfile.read(length)

    def record(self, body):
        target = self.path
        path, question, query = target.partition("?")
        headers = {}
        for name, value in self.headers.items():
            name = name.lower()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        event = dict(kind="request", scheme=self.server.scheme, peer=self.client_address[0], method=self.command,
                     target=target, path=path, query=query if question else None, headers=headers,
                     header_list=[[name, value] for name, value in self.headers.items()],
                     body=body.decode("utf-8", "replace"))
        emit(**event)
        return event

    def answer(self):
        if self.path.startswith("/ws") and self.headers.get("Upgrade", "").lower() == "websocket":
            self.record(b"")
            self.websocket()
            return
        data = json.dumps(self.record(self.read_body())).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def websocket(self):
        key = self.headers.get("Sec-WebSocket-Key", "").strip().encode()
        accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.close_connection = True
        # Frames are read from rfile: its buffer may already hold the first ones.
        while True:
            frame = self.read_frame()
            if frame is None:
                return
            fin_opcode, payload = frame
            opcode = fin_opcode & 0x0F
            emit(kind="ws_message", peer=self.client_address[0], opcode=opcode,
                 text=payload.decode("utf-8", "replace") if opcode == 1 else None, length=len(payload))
            if opcode == 9:  # ping: pong
                fin_opcode = 0x8A
            self.send_frame(fin_opcode, payload)
            if opcode == 8:  # close: echoed, then done
                return

    def read_frame(self):
        """One frame, unmasked: (first byte, payload), or None at EOF."""
        head = self.rfile.read(2)
        if len(head) < 2:
            return None
        length = head[1] & 0x7F
        if length == 126:
            length = struct.unpack("!H", self.rfile.read(2))[0]
        elif length == 127:
            length = struct.unpack("!Q", self.rfile.read(8))[0]
        if length > MAX_BODY:
            return None
        mask = self.rfile.read(4) if head[1] & 0x80 else b"\0\0\0\0"
        payload = self.rfile.read(length)
        if len(payload) < length:
            return None
        return head[0], bytes(b ^ mask[i % 4] for i, b in enumerate(payload))

    def send_frame(self, first_byte, payload):
        """Servers send unmasked frames."""
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", first_byte, n)
        elif n < 1 << 16:
            head = struct.pack("!BBH", first_byte, 126, n)
        else:
            head = struct.pack("!BBQ", first_byte, 127, n)
        self.wfile.write(head + payload)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--tls-port", type=int, required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    args = parser.parse_args()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(args.cert, args.key)
    context.set_alpn_protocols(["http/1.1"])
    for server in [Server(("::", args.http_port), RestApi), Server(("::", args.tls_port), RestApi, context)]:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    emit(kind="ready")
    threading.Event().wait()


if __name__ == "__main__":
    main()
