"""Both ends of the relay's interop test, with the `websockets` library.

`server`: prints {"port": P}, then echoes every message and prints what it
received, one JSON line each, until killed.
`client URL MODE`: one session through the relay, compressed (MODE
`takeover`, the library's default offer, or `no-takeover`, where the client
resets its compressor each message); prints what it got as one JSON line.
"""

import asyncio
import json
import sys

from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory

BIG = "a compressible line of text, over and over; " * 5000


def shown(message):
    return message if isinstance(message, str) else "bytes:" + message.hex()


async def server():
    async def echo(websocket):
        try:
            async for message in websocket:
                print(json.dumps({"received": shown(message)[:60], "len": len(message)}), flush=True)
                await websocket.send(message)
        except ConnectionClosed:
            pass
        close = websocket.protocol.close_rcvd
        print(json.dumps({"closed": close.code if close else None, "reason": close.reason if close else None}), flush=True)

    async with serve(echo, "127.0.0.1", 0, max_size=None) as listening:
        print(json.dumps({"port": listening.sockets[0].getsockname()[1]}), flush=True)
        await asyncio.Future()


async def client(url, mode):
    extensions = None
    if mode == "no-takeover":
        extensions = [ClientPerMessageDeflateFactory(client_no_context_takeover=True)]
    report = {"echoes": []}
    async with connect(url, extensions=extensions, open_timeout=10, close_timeout=10) as websocket:
        report["extensions"] = [repr(extension) for extension in websocket.protocol.extensions]
        for message in ["hello", BIG, b"\x00\x01 binary", ["frag", "mented"], "key PLACEHOLDER", BIG]:
            await websocket.send(message)
            echo = await asyncio.wait_for(websocket.recv(), 10)
            report["echoes"].append(shown(echo)[:60] + f" ({len(echo)})")
        await websocket.send("please deny this")
        try:
            await asyncio.wait_for(websocket.recv(), 10)
            report["close"] = "no close"
        except ConnectionClosed as closed:
            report["close"] = {"code": closed.rcvd.code, "reason": closed.rcvd.reason} if closed.rcvd else "none"
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "server":
        asyncio.run(server())
    else:
        asyncio.run(client(sys.argv[2], sys.argv[3]))
