"""Binding: a taken port is a clear error, whatever options the server was built with."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import grpc.aio
import pytest

import portshare
from conftest import serving_in_thread
from portshare import _common

QUIET = {"handle_signals": False, "watch_parent": False, "health": False}


@pytest.fixture
def listening_port() -> Iterator[int]:
    """A port a plain socket listens on (127.0.0.1)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.fixture
def grpc_default_port() -> Iterator[int]:
    """A port a grpcio server with its default options (SO_REUSEPORT on) listens on."""
    other = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = other.add_insecure_port("127.0.0.1:0")
    other.start()
    yield port
    other.stop(None).wait()


def test_serve_refuses_a_port_a_socket_listens_on(listening_port: int) -> None:
    with pytest.raises(portshare.BindError) as err:
        portshare.serve(portshare.server(), listening_port, **QUIET)
    assert f"127.0.0.1:{listening_port}" in str(err.value)
    assert "already in use" in str(err.value)


def test_serve_refuses_a_port_another_grpc_server_shares_by_default(
    grpc_default_port: int,
) -> None:
    # The case grpcio gets wrong by itself: a server built with the default options would
    # bind here and silently share the port. serve() refuses it.
    user_built = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    with pytest.raises(portshare.BindError, match="already in use"):
        portshare.serve(user_built, grpc_default_port, **QUIET)


def test_serve_async_refuses_a_taken_port(grpc_default_port: int) -> None:
    async def run() -> int:
        return await portshare.serve_async(grpc.aio.server(), grpc_default_port, **QUIET)

    with pytest.raises(portshare.BindError, match="already in use"):
        asyncio.run(run())


def test_a_later_server_cannot_share_the_port_of_portshare_server() -> None:
    ours = portshare.server(max_workers=1)
    port = ours.add_insecure_port("127.0.0.1:0")
    ours.start()
    try:
        later = grpc.server(futures.ThreadPoolExecutor(max_workers=1))  # SO_REUSEPORT on
        try:
            bound = later.add_insecure_port(f"127.0.0.1:{port}")
        except RuntimeError:
            bound = 0  # newer grpcio raises, older returns 0
        assert bound == 0
    finally:
        ours.stop(None).wait()


def test_factories_force_reuseport_off_over_a_given_value() -> None:
    opts = portshare.with_reuseport_off(
        [("grpc.so_reuseport", 1), ("grpc.max_send_message_length", 5)]
    )
    assert opts == [("grpc.max_send_message_length", 5), ("grpc.so_reuseport", 0)]


def test_serve_returns_0_when_its_stop_event_is_set() -> None:
    with serving_in_thread(0) as served:
        assert served[0] > 0
        with grpc.insecure_channel(f"127.0.0.1:{served[0]}") as channel:
            grpc.channel_ready_future(channel).result(timeout=10)


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX") or os.name == "nt", reason="Unix sockets")
def test_serve_binds_the_socket_portshare_gives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "worker-0-0.sock"
    monkeypatch.setenv("PORTSHARE_SOCKET", str(path))
    monkeypatch.delenv("PORTSHARE_PORT", raising=False)
    monkeypatch.setattr(sys, "argv", ["worker.py"])
    with serving_in_thread() as served:
        assert served == [0]
        assert stat.S_ISSOCK(path.stat().st_mode)
        with grpc.insecure_channel(f"unix:{path}") as channel:
            grpc.channel_ready_future(channel).result(timeout=10)


def test_a_socket_that_cannot_be_bound_is_a_bind_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "worker-0-0.sock"
    with pytest.raises(portshare.BindError, match="unix:"):
        _common.bind_socket(portshare.server(max_workers=1), str(missing))
