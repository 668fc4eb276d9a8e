"""portshare's reuseport mode (Linux): with ``PORTSHARE_SHARED_ADDR`` set, the helper builds
servers with SO_REUSEPORT on and binds the shared public address beside the worker's own
port, which portshare keeps for its checks."""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

import portshare
from conftest import serving_in_thread
from portshare import _shared

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="SO_REUSEPORT balancing is Linux's")


def test_no_shared_address_outside_reuseport_mode() -> None:
    assert portshare.resolve_shared({}) is None
    assert portshare.resolve_shared({"PORTSHARE_SHARED_ADDR": ""}) is None


def test_the_shared_address_is_read_and_checked() -> None:
    env = {"PORTSHARE_SHARED_ADDR": "127.0.0.1:50051"}
    assert portshare.resolve_shared(env) == "127.0.0.1:50051"
    assert portshare.resolve_shared({"PORTSHARE_SHARED_ADDR": "[::]:7"}) == "[::]:7"
    for bad in ("50051", "127.0.0.1:http", "127.0.0.1:0", ":5"):
        with pytest.raises(ValueError, match="PORTSHARE_SHARED_ADDR"):
            portshare.resolve_shared({"PORTSHARE_SHARED_ADDR": bad})


def test_factories_turn_reuseport_on_in_reuseport_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    given = [("grpc.so_reuseport", 0), ("grpc.max_send_message_length", 5)]
    assert portshare.with_worker_reuseport(given)[-1] == ("grpc.so_reuseport", 0)
    monkeypatch.setenv("PORTSHARE_SHARED_ADDR", "127.0.0.1:50051")
    assert portshare.with_worker_reuseport(given) == [
        ("grpc.max_send_message_length", 5),
        ("grpc.so_reuseport", 1),
    ]


@pytest.fixture
def held_address() -> Iterator[str]:
    """An address held as portshare holds it: bound with SO_REUSEPORT, not listening."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


@linux_only
def test_serve_listens_on_its_port_and_the_shared_address(
    held_address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PORTSHARE_SHARED_ADDR", held_address)
    with serving_in_thread(0, health=False) as served:
        assert served[0] > 0
        for target in (f"127.0.0.1:{served[0]}", held_address):
            with grpc.insecure_channel(target) as channel:
                grpc.channel_ready_future(channel).result(timeout=10)


@linux_only
def test_a_server_with_reuseport_off_cannot_join_the_shared_address(
    held_address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from concurrent import futures

    monkeypatch.setenv("PORTSHARE_SHARED_ADDR", held_address)
    off = grpc.server(
        futures.ThreadPoolExecutor(max_workers=1), options=portshare.with_reuseport_off()
    )
    with pytest.raises(portshare.BindError, match="so_reuseport"):
        portshare.serve(off, 0, handle_signals=False, watch_parent=False, health=False)


def _refused(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:
        return False  # queued on the listener as it went (tcp_migrate_req=0): ask again
    return False


def _local_channel(target: str) -> grpc.Channel:
    # A connection of its own, not one shared with other channels to the same address.
    return grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])


def _check(channel: grpc.Channel) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return int(reply.status)


def test_the_drain_is_bounded_by_the_grace() -> None:
    assert _shared.drain_budget(None) == 0.0
    assert _shared.drain_budget(0.5) == 0.5
    assert _shared.drain_budget(60.0) == _shared.SHARED_DRAIN


@linux_only
def test_leaving_the_shared_port_keeps_the_accepted_connections(held_address: str) -> None:
    from concurrent import futures

    from grpc_health.v1 import health, health_pb2_grpc

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2), options=[("grpc.so_reuseport", 1)]
    )
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port(held_address)
    server.start()
    try:
        with _local_channel(held_address) as channel:
            _check(channel)
            assert _shared.shared_connections(port) == 1
            assert _shared.leave_shared(port) == 1
            assert _refused(held_address)
            _check(channel)  # still served on the connection it had
            assert _shared.shared_connections(port) == 1
            assert _shared.leave_shared(port) == 0  # nothing left to leave
        deadline = time.monotonic() + 10
        while _shared.shared_connections(port) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _shared.shared_connections(port) == 0
    finally:
        server.stop(None).wait(10)


class _Serving:
    """``serve`` or ``serve_async`` on a thread of its own, stopped by ``stop()``."""

    def __init__(self, mode: str, **options: Any) -> None:
        self.served: list[int] = []
        self.result: list[int] = []
        quiet = {"on_serving": self.served.append, "handle_signals": False, "watch_parent": False}
        if mode == "sync":
            event = threading.Event()
            self.stop = event.set

            def run() -> None:
                server = portshare.server(max_workers=2)
                self.result.append(portshare.serve(server, 0, stop_event=event, **quiet, **options))
        else:
            loop = asyncio.new_event_loop()
            aio_event = asyncio.Event()

            def stop() -> None:
                if not loop.is_closed():
                    loop.call_soon_threadsafe(aio_event.set)

            self.stop = stop

            def run() -> None:
                async def main() -> int:
                    server = portshare.aio_server()
                    return await portshare.serve_async(
                        server, 0, stop_event=aio_event, **quiet, **options
                    )

                self.result.append(loop.run_until_complete(main()))
                loop.close()

        self.thread = threading.Thread(target=run)
        self.thread.start()


@linux_only
@pytest.mark.parametrize("mode", ["sync", "aio"])
def test_a_stop_leaves_the_shared_port_then_waits_for_its_connections(
    mode: str,
    held_address: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("PORTSHARE_SHARED_ADDR", held_address)
    monkeypatch.setattr(_shared, "SHARED_DRAIN", 60.0)  # ends when the connection closes
    caplog.set_level(logging.INFO, logger="portshare")
    serving = _Serving(mode, grace=60.0)
    try:
        with _local_channel(held_address) as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            assert _check(channel) == 1  # SERVING
            serving.stop()
            deadline = time.monotonic() + 10
            while not _refused(held_address) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert _refused(held_address), "the stopping worker still takes new connections"
            assert _check(channel) == 2  # NOT_SERVING, and answered all the same
            assert serving.thread.is_alive()  # waiting for this connection
        serving.thread.join(30)  # well before the 60 s bound: the connection closed
        assert not serving.thread.is_alive()
    finally:
        serving.stop()
        serving.thread.join(90)
    assert serving.result == [0]
    assert any("left the shared port" in r.getMessage() for r in caplog.records)
