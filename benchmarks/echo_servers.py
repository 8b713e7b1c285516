"""The TCP echo servers the echo benchmark runs, one per process: ``python echo_servers.py KIND``.

KIND is ``{asyncio,uvloop}-{streams,protocol}`` (the loop's own transports) or
``saferring-{streams,protocol}[-uvloop]`` (saferring.aio's transports on that loop).  The server
listens on 127.0.0.1 on a free port, prints the port on stdout, and serves until its standard
input closes.  Every variant echoes what it receives as it arrives, the way each API is
normally written: a protocol writes each chunk back from ``data_received``; a streams handler
loops ``data = await reader.read(65536)``, ``writer.write(data)``, ``await writer.drain()``.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any


class EchoProtocol(asyncio.Protocol):
    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


async def echo_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def serve(kind: str) -> None:
    loop = asyncio.get_running_loop()
    if kind.startswith("saferring"):
        import saferring.aio as aio

        if "-streams" in kind:
            server: Any = await aio.start_server(echo_stream, "127.0.0.1", 0)
        else:
            server = await aio.create_server(EchoProtocol, "127.0.0.1", 0)
    elif kind.endswith("streams"):
        server = await asyncio.start_server(echo_stream, "127.0.0.1", 0)
    else:
        server = await loop.create_server(EchoProtocol, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    stop = loop.create_future()
    loop.add_reader(sys.stdin.fileno(), lambda: stop.done() or stop.set_result(None))
    await stop
    server.close()


def main() -> None:
    kind = sys.argv[1]
    if "uvloop" in kind:
        import uvloop

        uvloop.run(serve(kind))
    else:
        asyncio.run(serve(kind))


if __name__ == "__main__":
    main()
