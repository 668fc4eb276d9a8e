"""portshare's reuseport mode (Linux): with ``PORTSHARE_SHARED_ADDR`` set, the helper builds
servers with SO_REUSEPORT on and binds the shared public address beside the worker's own
port, which portshare keeps for its checks."""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator

import grpc
import pytest

import portshare
from conftest import serving_in_thread

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
