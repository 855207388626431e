"""Counts, in a process of the pipeline bench's counting run, what one mail costs in messages
and calls: AMQP publishes, deliveries, gets, acks and confirms (by queue), msgpack encodes and
decodes (by the codec function that called), Redis commands and round trips (by command, a
function by its name). Written as JSON to ``$MAILPIPE_BENCH_COUNTS_DIR/<stage>-<pid>.json`` at
exit.

Loaded by Python itself (``sitecustomize``) in the processes whose PYTHONPATH holds this
folder: ``bench/where_time_goes.py`` sets it for the stages of its counting run only. The
wrappers cost CPU, so the timed runs never load it. Nothing of mailpipe is changed: pika,
msgpack and redis are wrapped at their own module level before mailpipe imports them.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

_DIR = os.environ.get("MAILPIPE_BENCH_COUNTS_DIR")
_NS = os.environ.get("MAILPIPE_NAMESPACE", "")
counts: dict[str, Counter[str]] = {"amqp": Counter(), "msgpack": Counter(), "redis": Counter()}


def _queue(name: str) -> str:
    """A queue or exchange without the run's namespace; lanes as one name."""
    if _NS and name.startswith(_NS + "."):
        name = name[len(_NS) + 1:]
    return "lane.*" if name.startswith("lane.") else (name or "(default)")


def _stage() -> str:
    argv = sys.argv
    if "run" in argv and argv.index("run") + 1 < len(argv):
        return argv[argv.index("run") + 1]
    return Path(argv[0]).stem if argv and argv[0] else "python"


def _dump() -> None:
    if not _DIR:
        return
    path = Path(_DIR) / f"{_stage()}-{os.getpid()}.json"
    path.write_text(json.dumps({"stage": _stage(), "pid": os.getpid(),
                                **{k: dict(v) for k, v in counts.items()}}))


def _caller(depth: int) -> str:
    """The first function outside the codec's helpers (``_pack``, ``_unpack``) that called."""
    frame = sys._getframe(depth)
    while frame is not None and frame.f_code.co_name in ("_pack", "_unpack"):
        frame = frame.f_back  # type: ignore[assignment]
    return frame.f_code.co_name if frame is not None else "?"


def _wrap_msgpack() -> None:
    import msgpack

    packb, unpackb = msgpack.packb, msgpack.unpackb

    def counted_packb(*args: Any, **kwargs: Any) -> Any:
        counts["msgpack"][f"packb {_caller(2)}"] += 1
        return packb(*args, **kwargs)

    def counted_unpackb(*args: Any, **kwargs: Any) -> Any:
        counts["msgpack"][f"unpackb {_caller(2)}"] += 1
        return unpackb(*args, **kwargs)

    msgpack.packb, msgpack.unpackb = counted_packb, counted_unpackb


def _wrap_pika() -> None:
    import pika.channel

    channel = pika.channel.Channel
    consumers: dict[str, str] = {}
    amqp = counts["amqp"]

    publish = channel.basic_publish

    def basic_publish(self: Any, exchange: str, routing_key: str, body: bytes, *args: Any, **kwargs: Any) -> Any:
        target = f"{_queue(exchange)}({routing_key.split('.', 1)[0]})" if exchange else _queue(routing_key)
        amqp[f"publish {target}"] += 1
        amqp[f"publish_bytes {target}"] += len(body)
        return publish(self, exchange, routing_key, body, *args, **kwargs)

    consume = channel.basic_consume

    def basic_consume(self: Any, queue: str, *args: Any, **kwargs: Any) -> Any:
        tag = consume(self, queue, *args, **kwargs)
        consumers[tag] = _queue(queue)
        return tag

    on_deliver = channel._on_deliver

    def _on_deliver(self: Any, method_frame: Any, header_frame: Any, body: bytes) -> Any:
        amqp[f"deliver {consumers.get(method_frame.method.consumer_tag, '?')}"] += 1
        return on_deliver(self, method_frame, header_frame, body)

    get = channel.basic_get
    gets: dict[int, str] = {}

    def basic_get(self: Any, queue: str, *args: Any, **kwargs: Any) -> Any:
        amqp[f"get {_queue(queue)}"] += 1
        gets[id(self)] = _queue(queue)
        return get(self, queue, *args, **kwargs)

    on_getok = channel._on_getok

    def _on_getok(self: Any, method_frame: Any, header_frame: Any, body: bytes) -> Any:
        amqp[f"get_ok {gets.get(id(self), '?')}"] += 1
        return on_getok(self, method_frame, header_frame, body)

    ack = channel.basic_ack

    def basic_ack(self: Any, delivery_tag: int = 0, multiple: bool = False) -> Any:
        amqp["ack frames" + (" (multiple)" if multiple else "")] += 1
        return ack(self, delivery_tag, multiple)

    nack = channel.basic_nack

    def basic_nack(self: Any, *args: Any, **kwargs: Any) -> Any:
        amqp["nack frames"] += 1
        return nack(self, *args, **kwargs)

    confirm = channel.confirm_delivery

    def confirm_delivery(self: Any, ack_nack_callback: Any, *args: Any, **kwargs: Any) -> Any:
        def counted(frame: Any) -> Any:
            amqp["confirm frames" + (" (multiple)" if frame.method.multiple else "")] += 1
            return ack_nack_callback(frame)
        return confirm(self, counted, *args, **kwargs)

    channel.basic_publish, channel.basic_consume, channel._on_deliver = basic_publish, basic_consume, _on_deliver
    channel.basic_get, channel._on_getok, channel.basic_ack = basic_get, _on_getok, basic_ack
    channel.basic_nack, channel.confirm_delivery = basic_nack, confirm_delivery


def _command(args: tuple[Any, ...]) -> str:
    name = str(args[0]).upper() if args else "?"
    if name in ("FCALL", "FCALL_RO") and len(args) > 1:
        return f"{name} {str(args[1]).rsplit('_', 1)[0]}"  # without the library's hash suffix
    return name


def _wrap_redis() -> None:
    import redis.asyncio.client
    import redis.client

    red = counts["redis"]
    sync_pipeline, async_pipeline = redis.client.Pipeline, redis.asyncio.client.Pipeline

    sync_execute = redis.client.Redis.execute_command

    def execute_command(self: Any, *args: Any, **options: Any) -> Any:
        red[f"command {_command(args)}"] += 1
        red["round trips"] += 1
        return sync_execute(self, *args, **options)  # type: ignore[no-untyped-call]

    async_execute = redis.asyncio.client.Redis.execute_command

    async def async_execute_command(self: Any, *args: Any, **options: Any) -> Any:
        red[f"command {_command(args)}"] += 1
        red["round trips"] += 1
        return await async_execute(self, *args, **options)  # type: ignore[no-untyped-call]

    sync_buffer = sync_pipeline.execute_command

    def pipeline_command(self: Any, *args: Any, **kwargs: Any) -> Any:
        red[f"command {_command(args)} (pipelined)"] += 1
        return sync_buffer(self, *args, **kwargs)  # type: ignore[no-untyped-call]

    async_buffer = async_pipeline.execute_command

    def async_pipeline_command(self: Any, *args: Any, **kwargs: Any) -> Any:
        red[f"command {_command(args)} (pipelined)"] += 1
        return async_buffer(self, *args, **kwargs)

    sync_run = sync_pipeline.execute

    def pipeline_execute(self: Any, *args: Any, **kwargs: Any) -> Any:
        red["round trips"] += 1
        return sync_run(self, *args, **kwargs)

    async_run = async_pipeline.execute

    async def async_pipeline_execute(self: Any, *args: Any, **kwargs: Any) -> Any:
        red["round trips"] += 1
        return await async_run(self, *args, **kwargs)

    redis.client.Redis.execute_command = execute_command  # type: ignore[method-assign]
    redis.asyncio.client.Redis.execute_command = async_execute_command  # type: ignore[method-assign]
    sync_pipeline.execute_command = pipeline_command  # type: ignore[method-assign]
    async_pipeline.execute_command = async_pipeline_command  # type: ignore[method-assign]
    sync_pipeline.execute = pipeline_execute  # type: ignore[method-assign]
    async_pipeline.execute = async_pipeline_execute  # type: ignore[method-assign]


if _DIR:
    _wrap_msgpack()
    _wrap_pika()
    _wrap_redis()
    atexit.register(_dump)
