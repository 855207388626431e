"""Redis 7 function libraries: small named Lua functions, loaded once, called with FCALL.

A library is built from Lua source files (package data): a shared prelude, then each file's
functions, each file registering its own with ``register('name', fn)``. The library's name and
every function's name carry a hash of the source, so two versions of mailpipe running side by
side (a rolling upgrade) each call their own code and never replace the other's.

Redis keeps loaded functions in memory (and in its RDB/AOF where it persists): after a restart
or a flush a call answers "Function not found"; ``Library.call`` loads the library again and
retries once. Every Redis failure becomes ``RedisUnavailable``.
"""

from __future__ import annotations

import hashlib
import importlib.resources
from collections.abc import Sequence
from typing import Any

import redis
import redis.asyncio

from mailpipe.errors import RedisUnavailable
from mailpipe.redis_client import WAIT_TIMEOUT_MS

Arg = str | int | float | bytes

_PRELUDE = """
local function register(name, fn)
  redis.register_function{function_name = name .. '_' .. LIBRARY_SUFFIX, callback = fn}
end
"""


def source(package: str, name: str) -> bytes:
    """A Lua file shipped as package data."""
    return importlib.resources.files(package).joinpath(name).read_bytes()


class Library:
    """One function library: ``call(client, "decide", keys, args)`` runs its ``decide``."""

    def __init__(self, name: str, sources: Sequence[bytes]) -> None:
        body = b"\n".join(sources)
        self.suffix = hashlib.sha1(body, usedforsecurity=False).hexdigest()[:12]
        self.name = f"{name}_{self.suffix}"
        self.code = (f"#!lua name={self.name}\nlocal LIBRARY_SUFFIX = '{self.suffix}'\n{_PRELUDE}\n").encode() + body

    def function(self, name: str) -> str:
        """The name Redis knows function ``name`` of this library by."""
        return f"{name}_{self.suffix}"

    def load(self, client: redis.Redis) -> None:
        try:
            client.function_load(self.code.decode(), replace=True)
        except redis.RedisError as exc:
            raise RedisUnavailable(f"Redis: loading function library {self.name} failed: "
                                   f"{type(exc).__name__}: {exc}") from exc

    def call(self, client: redis.Redis, name: str, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        """FCALL one function; loads the library once if Redis does not know it."""
        try:
            try:
                return client.fcall(self.function(name), len(keys), *keys, *args)
            except redis.exceptions.ResponseError as exc:
                if not missing(exc):
                    raise
                self.load(client)
                return client.fcall(self.function(name), len(keys), *keys, *args)
        except redis.RedisError as exc:
            raise RedisUnavailable(f"Redis: {name} failed: {type(exc).__name__}: {exc}") from exc

    async def acall(self, client: redis.asyncio.Redis, name: str, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        """``call`` on an asyncio client (the sender's SMTP loop)."""
        try:
            try:
                return await client.fcall(self.function(name), len(keys), *keys, *args)  # type: ignore[misc]
            except redis.exceptions.ResponseError as exc:
                if not missing(exc):
                    raise
                await client.function_load(self.code.decode(), replace=True)  # type: ignore[misc]
                return await client.fcall(self.function(name), len(keys), *keys, *args)  # type: ignore[misc]
        except redis.RedisError as exc:
            raise RedisUnavailable(f"Redis: {name} failed: {type(exc).__name__}: {exc}") from exc

    def queue(self, pipe: redis.client.Pipeline, name: str, keys: Sequence[str], args: Sequence[Arg]) -> None:
        """Add one FCALL to a pipeline; ``run_pipeline`` executes it."""
        pipe.fcall(self.function(name), len(keys), *keys, *args)

    def run_pipeline(self, client: redis.Redis, calls: Sequence[tuple[str, Sequence[str], Sequence[Arg]]],
                     wait_replicas: int = 0) -> list[Any]:
        """Several calls of this library in one round trip, each atomic, in order; with
        ``wait_replicas``, a WAIT on the same connection whose answer is returned last.
        Only calls that are safe to repeat may share a pipeline: when Redis does not know the
        library, none of them ran, and all run again once it is loaded."""
        for attempt in (1, 2):
            try:
                with client.pipeline(transaction=False) as pipe:
                    for name, keys, args in calls:
                        self.queue(pipe, name, keys, args)
                    if wait_replicas:
                        pipe.execute_command("WAIT", wait_replicas, WAIT_TIMEOUT_MS)  # type: ignore[no-untyped-call]
                    return pipe.execute()
            except redis.exceptions.ResponseError as exc:
                if attempt == 2 or not missing(exc):
                    raise RedisUnavailable(f"Redis: {calls[0][0]} failed: {exc}") from exc
                self.load(client)
            except redis.RedisError as exc:
                raise RedisUnavailable(f"Redis: {calls[0][0]} failed: {type(exc).__name__}: {exc}") from exc
        raise AssertionError("unreachable")


def missing(exc: redis.exceptions.ResponseError) -> bool:
    """Is this Redis saying it does not know the function (restarted, flushed, never loaded)?"""
    return "function not found" in str(exc).lower()

