"""The two systemd protocols the daemon speaks, in the standard library only.

``sd_notify``: datagrams to ``$NOTIFY_SOCKET`` (READY, RELOADING, STOPPING, STATUS, WATCHDOG).
Socket activation: inherited listening sockets from fd 3 on (``$LISTEN_PID``, ``$LISTEN_FDS``).
Outside systemd every function is a cheap no-op, so the daemon calls them unconditionally.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping, MutableMapping

SD_LISTEN_FDS_START = 3
_LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def _environ(environ: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if environ is None else environ


def _notify_address(value: str) -> str | None:
    if value.startswith("@"):
        return "\0" + value[1:]  # Linux abstract namespace
    if value.startswith("/"):
        return value
    return None  # vsock:... and anything else is not for us


def notify(message: str, *, environ: Mapping[str, str] | None = None) -> bool:
    """Send one sd_notify datagram; False when there is no (usable) ``$NOTIFY_SOCKET``."""
    address = _notify_address(_environ(environ).get("NOTIFY_SOCKET", ""))
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError:
        return False
    return True


def _one_line(text: str) -> str:
    return " ".join(text.split())


def ready(status: str = "", *, environ: Mapping[str, str] | None = None) -> bool:
    message = "READY=1"
    if status:
        message += f"\nSTATUS={_one_line(status)}"
    return notify(message, environ=environ)


def reloading(*, environ: Mapping[str, str] | None = None) -> bool:
    """Announce a reload; systemd wants the monotonic timestamp with it. Follow with ready()."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(f"RELOADING=1\nMONOTONIC_USEC={usec}", environ=environ)


def stopping(status: str = "", *, environ: Mapping[str, str] | None = None) -> bool:
    message = "STOPPING=1"
    if status:
        message += f"\nSTATUS={_one_line(status)}"
    return notify(message, environ=environ)


def status(text: str, *, environ: Mapping[str, str] | None = None) -> bool:
    return notify(f"STATUS={_one_line(text)}", environ=environ)


def watchdog(*, environ: Mapping[str, str] | None = None) -> bool:
    return notify("WATCHDOG=1", environ=environ)


def watchdog_interval(
    environ: Mapping[str, str] | None = None, *, pid: int | None = None
) -> float | None:
    """How often to send WATCHDOG=1: half of ``$WATCHDOG_USEC``, or None if no watchdog is on."""
    env = _environ(environ)
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    owner = env.get("WATCHDOG_PID")
    if owner is not None and owner != str(os.getpid() if pid is None else pid):
        return None
    return usec / 2 / 1_000_000 if usec > 0 else None


def listen_sockets(environ: MutableMapping[str, str] | None = None) -> list[socket.socket]:
    """The listening sockets systemd passed us (fd 3 onwards), close-on-exec, env vars removed.

    The variables are removed whether or not they were meant for this process, so a child we
    might start never mistakes them for its own.
    """
    env = os.environ if environ is None else environ
    pid, count = env.get("LISTEN_PID", ""), env.get("LISTEN_FDS", "")
    for name in _LISTEN_VARS:
        env.pop(name, None)
    if pid != str(os.getpid()) or not count.isdigit():
        return []
    sockets = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count)):
        os.set_inheritable(fd, False)
        sockets.append(socket.socket(fileno=fd))
    return sockets
