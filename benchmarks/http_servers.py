"""The asyncio static-file server the HTTP benchmark compares with: ``python http_servers.py LOOP DIR``.

LOOP is ``asyncio`` (the stock event loop) or ``uvloop``.  The server listens on 127.0.0.1 on a
free port, prints the port on stdout, and serves the files under DIR until its standard input
closes.  It is written the way a small asyncio server usually is: asyncio streams
(``start_server``), one coroutine per connection reading request heads with ``readuntil``, and
for each request what examples/http_server.py does too: open the file, ``fstat`` it, answer
``GET``/``HEAD`` with Content-Type, Content-Length, Last-Modified and a single ``Range``, keep
the connection alive (HTTP/1.1 unless ``Connection: close``; HTTP/1.0 only when asked), refuse
paths that leave DIR (``..`` segments, symlinks: ``realpath`` must stay under DIR).

Bodies: up to 64 KiB are read with one ``os.pread`` and written with the head; larger ones go
through ``loop.sendfile`` where the loop has it (the stock loop: ``os.sendfile``, no copy
through Python), else (uvloop, which does not implement ``loop.sendfile``) in 256 KiB
``os.pread`` + ``write`` + ``drain`` steps.  File system calls are made on the loop thread: the
files are in the page cache, and a thread hop per call would cost more than the call.
"""

from __future__ import annotations

import asyncio
import email.utils
import mimetypes
import os
import re
import stat
import sys
from typing import Any
from urllib.parse import unquote

SMALL = 64 * 1024
CHUNK = 256 * 1024
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


class FileServer:
    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)

    def resolve(self, target: str) -> str | None:
        """The file under the root that ``target`` names, or None if it would leave the root."""
        path = unquote(target.partition("?")[0])
        if "\0" in path or ".." in path.split("/"):
            return None
        real = os.path.realpath(os.path.join(self.root, path.lstrip("/")))
        if real != self.root and not real.startswith(self.root + os.sep):
            return None
        if os.path.isdir(real):
            real = os.path.join(real, "index.html")
        return real

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await self.one(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ")
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        conn = headers.get("connection", "").lower()
        keep = "close" not in conn if version == "HTTP/1.1" else "keep-alive" in conn
        if method not in ("GET", "HEAD"):
            self.error(writer, 405, "Method Not Allowed", keep)
            return keep
        path = self.resolve(target)
        if path is None:
            self.error(writer, 403, "Forbidden", keep)
            return keep
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self.error(writer, 404, "Not Found", keep)
            return keep
        except OSError:
            self.error(writer, 403, "Forbidden", keep)
            return keep
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                self.error(writer, 403, "Forbidden", keep)
                return keep
            start, length, code = 0, st.st_size, "200 OK"
            extra = ""
            m = _RANGE.fullmatch(headers.get("range", ""))
            if m and (m.group(1) or m.group(2)):
                if m.group(1):
                    start = int(m.group(1))
                    end = min(int(m.group(2)) if m.group(2) else st.st_size - 1, st.st_size - 1)
                else:
                    start = max(0, st.st_size - int(m.group(2)))
                    end = st.st_size - 1
                if start >= st.st_size or end < start:
                    self.error(writer, 416, "Range Not Satisfiable", keep)
                    return keep
                length, code = end - start + 1, "206 Partial Content"
                extra = f"Content-Range: bytes {start}-{end}/{st.st_size}\r\n"
            kind = mimetypes.guess_type(path)[0] or "application/octet-stream"
            now = email.utils.formatdate(usegmt=True)
            modified = email.utils.formatdate(st.st_mtime, usegmt=True)
            conn_header = "" if keep and version == "HTTP/1.1" else \
                "Connection: keep-alive\r\n" if keep else "Connection: close\r\n"
            writer.write(
                f"HTTP/1.1 {code}\r\nServer: asyncio-static\r\nDate: {now}\r\nContent-Type: {kind}\r\n"
                f"Content-Length: {length}\r\nLast-Modified: {modified}\r\n{extra}{conn_header}"
                "\r\n".encode("latin-1"))
            if method == "GET":
                await self.body(writer, fd, start, length)
            await writer.drain()
        finally:
            os.close(fd)
        return keep

    async def body(self, writer: asyncio.StreamWriter, fd: int, start: int, length: int) -> None:
        if length <= SMALL:
            writer.write(os.pread(fd, length, start))
            return
        loop = asyncio.get_running_loop()
        await writer.drain()
        try:
            with os.fdopen(os.dup(fd), "rb") as f:
                await loop.sendfile(writer.transport, f, start, length, fallback=False)
            return
        except (NotImplementedError, asyncio.SendfileNotAvailableError):
            pass  # uvloop: no loop.sendfile
        end = start + length
        while start < end:
            data = os.pread(fd, min(CHUNK, end - start), start)
            if not data:
                raise ConnectionError("the file shrank")
            writer.write(data)
            start += len(data)
            await writer.drain()

    def error(self, writer: asyncio.StreamWriter, code: int, reason: str, keep: bool) -> None:
        body = f"{code} {reason}\n".encode()
        close = "" if keep else "Connection: close\r\n"
        writer.write(f"HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain\r\nContent-Length: "
                     f"{len(body)}\r\n{close}\r\n".encode() + body)


async def serve(root: str) -> None:
    loop = asyncio.get_running_loop()
    server: Any = await asyncio.start_server(FileServer(root).handle, "127.0.0.1", 0, limit=16384)
    print(server.sockets[0].getsockname()[1], flush=True)
    stop: asyncio.Future[None] = loop.create_future()

    def stdin_closed() -> None:
        if not stop.done():
            stop.set_result(None)

    loop.add_reader(sys.stdin.fileno(), stdin_closed)
    await stop
    server.close()


def main() -> None:
    kind, root = sys.argv[1], sys.argv[2]
    if kind == "uvloop":
        import uvloop

        uvloop.run(serve(root))
    else:
        asyncio.run(serve(root))


if __name__ == "__main__":
    main()
