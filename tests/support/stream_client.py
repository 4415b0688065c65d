#!/usr/bin/env python3
"""One stream's first bytes, sent as a sandboxed client would, for tests of
what a server sees: connects to --to HOST:PORT, waits --delay-ms (0: sends
right after the connect), sends a TLS ClientHello for --sni (built by
Python's ssl, the name checked by nobody) or the --send-hex bytes, shuts its
side down, and reads until the other side closes or resets. Prints
{"sent": bytes, "sha256": hex digest of them, "received": bytes read,
"end": "eof" | "reset" | "timeout"}.
"""
import argparse
import errno
import hashlib
import json
import socket
import ssl
import time


def client_hello(sni):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=sni)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--to", required=True, help="HOST:PORT")
    parser.add_argument("--sni")
    parser.add_argument("--send-hex")
    parser.add_argument("--delay-ms", type=int, default=0)
    args = parser.parse_args()
    host, port = args.to.rsplit(":", 1)
    payload = client_hello(args.sni) if args.sni else bytes.fromhex(args.send_hex)
    stream = socket.create_connection((host.strip("[]"), int(port)), timeout=10)
    if args.delay_ms:
        time.sleep(args.delay_ms / 1000)
    received, end = 0, "eof"
    try:
        stream.sendall(payload)
        stream.shutdown(socket.SHUT_WR)
        while True:
            data = stream.recv(65536)
            if not data:
                break
            received += len(data)
    except (ConnectionResetError, BrokenPipeError):
        end = "reset"
    except socket.timeout:
        end = "timeout"
    except OSError as error:
        # Reset before the shutdown: the socket is no longer connected.
        if error.errno != errno.ENOTCONN:
            raise
        end = "reset"
    stream.close()
    print(json.dumps({"sent": len(payload), "sha256": hashlib.sha256(payload).hexdigest(),
                      "received": received, "end": end}))


if __name__ == "__main__":
    main()
