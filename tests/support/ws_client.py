#!/usr/bin/env python3
"""A WebSocket client (Python `websockets`, permessage-deflate offered as
the library does by default, or not with --no-compression) run in the
sandbox: sends each message given, one at a time, and prints one JSON line
per step: {"sent", "echo"} for a message echoed back, {"closed": code,
"reason"} when the session ends instead; with --wait-close it then waits
(up to --wait seconds) for the session to end and prints how.
Prints {"deflate": bool} first: whether compression was negotiated."""
import argparse
import asyncio
import json
import ssl
import sys

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed


def emit(**event):
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--cafile", required=True)
    parser.add_argument("--no-compression", action="store_true")
    parser.add_argument("--wait-close", action="store_true")
    parser.add_argument("--wait", type=float, default=10)
    parser.add_argument("messages", nargs="*")
    args = parser.parse_args()
    context = ssl.create_default_context(cafile=args.cafile)
    compression = None if args.no_compression else "deflate"
    async with connect(args.url, ssl=context, compression=compression, open_timeout=10) as connection:
        extensions = connection.response.headers.get("Sec-WebSocket-Extensions", "")
        emit(deflate="permessage-deflate" in extensions)
        try:
            for message in args.messages:
                await connection.send(message)
                echo = await asyncio.wait_for(connection.recv(), timeout=args.wait)
                emit(sent=message, echo=echo)
            if args.wait_close:
                emit(waiting=True)
                await asyncio.wait_for(connection.wait_closed(), timeout=args.wait)
        except ConnectionClosed as closed:
            emit(closed=closed.rcvd.code if closed.rcvd else None, reason=closed.rcvd.reason if closed.rcvd else None)
            return
        if args.wait_close:
            emit(closed=connection.close_code, reason=connection.close_reason)


if __name__ == "__main__":
    asyncio.run(main())
