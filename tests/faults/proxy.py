"""A TCP proxy of the tests' own, on loopback, between the sender and the SMTP peer.

    with FaultProxy(peer.port) as proxy:      # point the servers file at proxy.port
        proxy.latency_s = 0.05                 # every chunk, each way, waits this long
        proxy.reset_rate = 0.02                # each client chunk: this chance to reset both sides
        proxy.blackhole = True                 # new connections are accepted, then never answered

Every connection the proxy resets is remembered as a ``Cut`` (its upstream source port, as the
peer sees it), for the ledger to explain a mail the peer accepted but the sender never heard
about. Seeded: the same run resets the same chunks.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import threading
import time

from tests.faults.ledger import Cut


class FaultProxy:
    def __init__(self, target_port: int, *, host: str = "127.0.0.1", seed: int = 5) -> None:
        self.target = (host, target_port)
        self.host = host
        self.port = 0
        self.latency_s = 0.0
        self.reset_rate = 0.0
        self.blackhole = False
        self.cuts: list[Cut] = []
        self.connections = 0
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def __enter__(self) -> FaultProxy:
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            self._server = loop.run_until_complete(asyncio.start_server(self._serve, self.host, 0))
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            loop.run_forever()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="fault-proxy", daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def __exit__(self, *_exc: object) -> None:
        loop = self._loop
        if loop is None or self._thread is None:
            return

        async def shut() -> None:
            if self._server is not None:
                self._server.close()
            for writer in list(self._writers):
                writer.close()
            tasks = [t for t in asyncio.all_tasks(loop) if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shut(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(10)
        loop.close()

    def _decide_reset(self) -> bool:
        with self._lock:
            return self.reset_rate > 0 and self._rng.random() < self.reset_rate

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        with self._lock:
            self.connections += 1
        if self.blackhole:
            # Accepted, never answered: the client's own timeout must end it.
            with contextlib.suppress(ConnectionError):
                while await reader.read(65536):
                    pass
            self._abort(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            self._abort(writer)
            return
        self._writers.add(up_writer)
        up_port = up_writer.get_extra_info("sockname")[1]
        reset = False

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, from_client: bool) -> None:
            nonlocal reset
            try:
                while not reset:
                    chunk = await src.read(65536)
                    if not chunk:
                        break
                    if self.latency_s:
                        await asyncio.sleep(self.latency_s)
                    dst.write(chunk)
                    await dst.drain()
                    if from_client and self._decide_reset():
                        # After forwarding: the peer may act on this chunk (accept a mail)
                        # while the client never hears back.
                        with self._lock:
                            self.cuts.append(Cut(up_port, time.time(), "proxy reset"))
                        reset = True
            except (ConnectionError, OSError):
                pass
            finally:
                # Either side ending ends both: the other pump's read returns at once.
                for w in (writer, up_writer):
                    if reset:
                        self._abort(w)
                    else:
                        w.close()
                        self._writers.discard(w)

        await asyncio.gather(pump(reader, up_writer, True), pump(up_reader, writer, False))

    def _abort(self, writer: asyncio.StreamWriter) -> None:
        """Close with a TCP reset (linger 0), as a broken middlebox does."""
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
        self._writers.discard(writer)
