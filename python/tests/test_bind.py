"""Binding: a taken port is a clear error, whatever options the server was built with."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from concurrent import futures

import grpc
import grpc.aio
import pytest

import portshare

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
    import threading

    stop = threading.Event()
    served: list[int] = []
    result: list[int] = []

    def run() -> None:
        result.append(
            portshare.serve(
                portshare.server(max_workers=1),
                0,
                stop_event=stop,
                on_serving=served.append,
                handle_signals=False,
                watch_parent=False,
            )
        )

    thread = threading.Thread(target=run)
    thread.start()
    try:
        for _ in range(300):  # up to 30 s: poll, do not sleep a guess
            if served:
                break
            thread.join(0.1)
        assert served and served[0] > 0
        with grpc.insecure_channel(f"127.0.0.1:{served[0]}") as channel:
            grpc.channel_ready_future(channel).result(timeout=10)
    finally:
        stop.set()
        thread.join(15)
    assert result == [0]
