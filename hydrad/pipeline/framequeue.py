"""A bounded queue that drops its *oldest* item when full.

trio's memory channels apply backpressure, which is right for most stages but wrong between
capture and uplink: when the network stalls, the mic must not stall (the engine keeps
capturing), and when it recovers, the user's *latest* audio is what matters. So this stage
keeps the live edge and counts what it dropped.
"""

from __future__ import annotations

import collections
from typing import Generic, TypeVar

import trio

T = TypeVar("T")


class DropOldestQueue(Generic[T]):
    def __init__(self, maxlen: int) -> None:
        self._q: collections.deque[T] = collections.deque()
        self.maxlen = maxlen
        self.dropped = 0
        self._lot = trio.lowlevel.ParkingLot()

    def __len__(self) -> int:
        return len(self._q)

    def put_nowait(self, item: T) -> bool:
        """Append; returns True when the oldest item had to be dropped to make room."""
        dropped = False
        if len(self._q) >= self.maxlen:
            self._q.popleft()
            self.dropped += 1
            dropped = True
        self._q.append(item)
        self._lot.unpark()
        return dropped

    async def get(self) -> T:
        while not self._q:
            await self._lot.park()
        return self._q.popleft()

    def clear(self) -> int:
        n = len(self._q)
        self._q.clear()
        return n
