from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar import systemd


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, dict[str, str]]]:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    with sock:
        yield sock, {"NOTIFY_SOCKET": str(path)}


def received(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def test_notify_without_socket_is_a_quiet_no() -> None:
    assert systemd.notify("READY=1", environ={}) is False


def test_notify_to_a_missing_socket_does_not_raise(tmp_path: Path) -> None:
    env = {"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}
    assert systemd.ready("up", environ=env) is False


def test_notify_ignores_unsupported_addresses() -> None:
    assert systemd.notify("READY=1", environ={"NOTIFY_SOCKET": "vsock:2:1234"}) is False


def test_ready_status_and_watchdog(notify_socket: tuple[socket.socket, dict[str, str]]) -> None:
    sock, env = notify_socket
    assert systemd.ready("serving on 127.0.0.1:8700", environ=env)
    assert received(sock) == "READY=1\nSTATUS=serving on 127.0.0.1:8700"
    assert systemd.status("3 providers\nhealthy", environ=env)
    assert received(sock) == "STATUS=3 providers healthy"
    assert systemd.watchdog(environ=env)
    assert received(sock) == "WATCHDOG=1"
    assert systemd.stopping("draining", environ=env)
    assert received(sock) == "STOPPING=1\nSTATUS=draining"


def test_reloading_carries_monotonic_usec(
    notify_socket: tuple[socket.socket, dict[str, str]],
) -> None:
    sock, env = notify_socket
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert systemd.reloading(environ=env)
    lines = received(sock).split("\n")
    assert lines[0] == "RELOADING=1"
    key, value = lines[1].split("=")
    assert key == "MONOTONIC_USEC" and int(value) >= before


def test_abstract_notify_socket() -> None:
    name = f"tokenhub-test-{os.getpid()}-{id(object())}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    with sock:
        assert systemd.notify("READY=1", environ={"NOTIFY_SOCKET": "@" + name})
        assert received(sock) == "READY=1"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4243"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert systemd.watchdog_interval(env, pid=4242) == expected


def test_listen_sockets_for_another_pid_are_ignored_and_unset() -> None:
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "http"}
    assert systemd.listen_sockets(env) == []
    assert env == {}


_CHILD = """
import os, sys
inherited = int(sys.argv[1])
if inherited != 3:  # put the listener at fd 3, where systemd puts the first one
    os.dup2(inherited, 3)
    os.close(inherited)
os.environ["LISTEN_PID"] = str(os.getpid())
from sidecar import systemd
socks = systemd.listen_sockets()
print(len(socks), os.environ.get("LISTEN_FDS"), os.get_inheritable(3))
conn, _ = socks[0].accept()
conn.sendall(b"hello from the activated child")
conn.close()
"""


def test_listen_sockets_adopts_inherited_fd_in_a_child() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(listener.fileno())],
        env={**os.environ, "LISTEN_FDS": "1"},
        pass_fds=(listener.fileno(),),
        stdout=subprocess.PIPE,
        text=True,
    )
    listener.close()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.settimeout(10)
        assert client.recv(100) == b"hello from the activated child"
    out, _ = child.communicate(timeout=20)
    assert child.returncode == 0
    assert out.split() == ["1", "None", "False"]
