#!/usr/bin/env python3
"""A WebSocket echo server (Python `websockets`) over TLS, run in a test
network namespace: every message it receives is printed as one JSON line
{"kind": "message", "path", "text"} and echoed back; each connection's end
as {"kind": "closed", "path", "code"}. permessage-deflate is on (the
library's default); "ready" is printed once it listens."""
import argparse
import asyncio
import json
import ssl
import sys

from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed


def emit(**event):
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


async def echo(connection):
    path = connection.request.path
    try:
        async for message in connection:
            emit(kind="message", path=path, text=message if isinstance(message, str) else message.hex())
            await connection.send(message)
    except ConnectionClosed:
        pass
    emit(kind="closed", path=path, code=connection.close_code)


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    args = parser.parse_args()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(args.cert, args.key)
    async with serve(echo, "0.0.0.0", args.port, ssl=context):
        emit(kind="ready", port=args.port)
        await asyncio.Future()


if __name__ == "__main__":
    asyncio.run(main())
