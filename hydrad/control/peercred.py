"""Who is on the other end of a Unix socket, and may they drive the daemon.

The kernel records the peer's credentials when it calls ``connect()``: ``SO_PEERCRED`` gives
its pid, uid and primary gid; ``SO_PEERGROUPS`` (Linux >= 4.13) its supplementary groups,
so an operator who is a *member* of the control group (the usual setup: ``usermod -aG
hydrad alice``) is recognised even though their primary group is their own. Neither can
be forged by the peer, and neither changes if the peer later drops or gains privileges.

The allow-list: root, the daemon's own uid, any peer whose groups include the daemon's own
gid, plus ``control.allow_uids`` / ``control.allow_gids``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import socket
import struct
import sys
from dataclasses import dataclass
from typing import Iterable

SO_PEERCRED = getattr(socket, "SO_PEERCRED", 17)
#: from <asm-generic/socket.h>; Python's socket module does not export it
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
_UCRED = struct.Struct("3i")
#: CPython's getsockopt() refuses buffers above 1024 bytes (256 groups); ctypes beyond that
_PY_MAX_BUFLEN = 1024
_NGROUPS_MAX = 65536


@dataclass(frozen=True)
class PeerCred:
    pid: int
    uid: int
    gid: int
    #: supplementary groups, or None when the kernel could not tell (old kernel, not Linux)
    groups: tuple[int, ...] | None = None

    @property
    def all_gids(self) -> frozenset[int]:
        return frozenset((self.gid, *(self.groups or ())))

    def describe(self) -> str:
        return f"pid {self.pid} uid {self.uid} gid {self.gid}"


def _getsockopt_large(fd: int, level: int, opt: int, size: int) -> bytes:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    buf = ctypes.create_string_buffer(size)
    n = ctypes.c_uint32(size)
    if libc.getsockopt(fd, level, opt, buf, ctypes.byref(n)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return buf.raw[: n.value]


def _peer_groups(sock: socket.socket) -> tuple[int, ...] | None:
    if not sys.platform.startswith("linux"):
        return None
    for size in (256, _PY_MAX_BUFLEN):
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
            break
        except OSError as exc:
            if exc.errno == errno.ERANGE:
                continue
            return None  # ENOPROTOOPT on kernels before 4.13
    else:
        try:
            raw = _getsockopt_large(sock.fileno(), socket.SOL_SOCKET, SO_PEERGROUPS, 4 * _NGROUPS_MAX)
        except (OSError, AttributeError, TypeError):
            return None
    n = len(raw) // 4
    return struct.unpack(f"{n}I", raw[: 4 * n])


def peer_credentials(sock: socket.socket) -> PeerCred:
    """Read the connected peer's credentials (raises OSError if the socket cannot tell)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCred(pid, uid, gid, _peer_groups(sock))


@dataclass(frozen=True)
class AllowList:
    uids: frozenset[int]
    gids: frozenset[int]

    @classmethod
    def build(cls, allow_uids: Iterable[int] = (), allow_gids: Iterable[int] = (), *,
              own_uid: int | None = None, own_gid: int | None = None) -> "AllowList":
        own_uid = os.geteuid() if own_uid is None else own_uid
        own_gid = os.getegid() if own_gid is None else own_gid
        return cls(frozenset({0, own_uid, *allow_uids}), frozenset({own_gid, *allow_gids}))

    def allows(self, peer: PeerCred) -> bool:
        return peer.uid in self.uids or bool(peer.all_gids & self.gids)

    def describe(self) -> str:
        return f"uids {sorted(self.uids)}, gids {sorted(self.gids)}"
