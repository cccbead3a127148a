"""Redis connections that send a large command a piece at a time.

redis-py keeps a large argument (a memoryview of a model's tensors) out of its own
buffers, but then hands the command to ``StreamWriter.writelines``, which on Python
3.11 joins it into one bytes object and, when the socket takes only part of it, copies
the rest into the transport's buffer: two transient copies of a 400 MB model. These
connections send a command of more than :data:`WHOLE_BELOW` bytes as consecutive
writes of at most :data:`WRITE_PIECE_BYTES`, each drained before the next (the same
bytes on the wire, one command), so at most a piece is ever copied.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Final

import redis.asyncio as aioredis
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection
from redis.exceptions import ConnectionError as RedisConnectionError

__all__ = ["WHOLE_BELOW", "WRITE_PIECE_BYTES", "send_in_pieces", "use_piecewise_connections"]

#: A command up to this size is sent as redis-py sends it.
WHOLE_BELOW: Final = 4 << 20
#: The most one write of a larger command holds (and so the most copied at once).
WRITE_PIECE_BYTES: Final = 1 << 20

Packed = bytes | str | Iterable[bytes]
Send = Callable[[Packed, bool], Awaitable[None]]


def _size(command: Packed) -> int:
    if isinstance(command, bytes | str):
        return len(command)
    return sum(memoryview(c).nbytes for c in command)


def _writes(command: Iterable[bytes], size: int) -> Iterator[list[memoryview]]:
    """The command's chunks regrouped into writes of at most ``size`` bytes (views)."""
    batch: list[memoryview] = []
    room = size
    for chunk in command:
        view = memoryview(chunk).cast("B")
        while view.nbytes:
            take = view[:room]
            batch.append(take)
            view = view[take.nbytes :]
            room -= take.nbytes
            if room == 0:
                yield batch
                batch, room = [], size
    if batch:
        yield batch


async def send_in_pieces(
    send: Send, connected: Callable[[], bool], command: Packed, check_health: bool
) -> None:
    """Send ``command`` with ``send`` (redis-py's ``send_packed_command``): whole when
    it is small, else a piece at a time. A piece that fails raises (and redis-py has
    dropped the connection); a connection gone between pieces raises too, so the rest
    of a command is never sent on a new one."""
    if isinstance(command, bytes | str) or _size(command) <= WHOLE_BELOW:
        await send(command, check_health)
        return
    first = True
    for batch in _writes(command, WRITE_PIECE_BYTES):
        if not first and not connected():
            raise RedisConnectionError("the connection closed while a command was sent")
        await send(batch, check_health and first)  # type: ignore[arg-type]
        first = False


class PiecewiseConnection(Connection):
    """A TCP connection sending large commands a piece at a time."""

    async def send_packed_command(self, command: Packed, check_health: bool = True) -> None:
        await send_in_pieces(
            super().send_packed_command, lambda: self.is_connected, command, check_health
        )


class PiecewiseSSLConnection(SSLConnection):
    """A TLS connection sending large commands a piece at a time."""

    async def send_packed_command(self, command: Packed, check_health: bool = True) -> None:
        await send_in_pieces(
            super().send_packed_command, lambda: self.is_connected, command, check_health
        )


class PiecewiseUnixConnection(UnixDomainSocketConnection):
    """A Unix socket connection sending large commands a piece at a time."""

    async def send_packed_command(self, command: Packed, check_health: bool = True) -> None:
        await send_in_pieces(
            super().send_packed_command, lambda: self.is_connected, command, check_health
        )


_PIECEWISE: Final[dict[type, type]] = {
    Connection: PiecewiseConnection,
    SSLConnection: PiecewiseSSLConnection,
    UnixDomainSocketConnection: PiecewiseUnixConnection,
}


def use_piecewise_connections(client: aioredis.Redis) -> None:
    """Make ``client``'s pool open piecewise connections (of the kind its URL chose)."""
    pool = client.connection_pool
    pool.connection_class = _PIECEWISE.get(pool.connection_class, pool.connection_class)
