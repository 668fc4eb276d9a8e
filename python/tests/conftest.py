"""Starts helper-based workers (worker_app.py) as real processes and talks to them.

Everything listens on 127.0.0.1 with ports the OS picks; every wait is a poll with a
deadline, never a fixed sleep.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

HERE = Path(__file__).resolve().parent
WORKER_APP = HERE / "worker_app.py"
#: Generous for a busy 2-core machine: a Python process that imports grpc takes ~0.5 s.
START_TIMEOUT = 30.0
_EOF = "\0EOF"


def python_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment, with the checkout's helper importable and no PORTSHARE_* of the
    caller's (a test sets the ones it means)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTSHARE_")}
    package_root = str(HERE.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class Lines:
    """Follows a pipe on a thread; lines can be awaited with a deadline."""

    def __init__(self, pipe: IO[str]) -> None:
        self._queue: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._follow, args=(pipe,), daemon=True).start()

    def _follow(self, pipe: IO[str]) -> None:
        for line in pipe:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(_EOF)

    def wait_for(self, prefix: str, timeout: float = START_TIMEOUT) -> str:
        """The next line starting with ``prefix``; fails after ``timeout`` or at EOF."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no {prefix!r} line within {timeout} s; got {self.seen}")
            if line == _EOF:
                pytest.fail(f"the pipe closed before a {prefix!r} line; got {self.seen}")
            self.seen.append(line)
            if line.startswith(prefix):
                return line

    def wait_eof(self, timeout: float) -> bool:
        """Whether the pipe closed (every process holding it exited) within ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return False
            if line == _EOF:
                return True
            self.seen.append(line)


class Worker:
    """A running worker_app.py."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        assert proc.stdout is not None and proc.stderr is not None
        self.stdout = Lines(proc.stdout)
        self.stderr = Lines(proc.stderr)
        self.port = int(self.stdout.wait_for("PORT ").split()[1])

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def terminate(self) -> None:
        """What portshare (or a user) sends to stop it: SIGTERM; Ctrl-Break on Windows."""
        if sys.platform == "win32":
            self.proc.send_signal(signal.CTRL_BREAK_EVENT)
        else:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)


def spawn(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """A Python child with piped output, in its own process group on Windows (so that
    Ctrl-Break can be sent to it alone)."""
    flags = subprocess.CREATE_NEW_PROCESS_GROUP if sys.platform == "win32" else 0
    return subprocess.Popen(
        [sys.executable, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=python_env(env),
        creationflags=flags,
    )


@pytest.fixture(params=["sync", "aio"])
def mode(request: pytest.FixtureRequest) -> str:
    """Every process-level test runs against serve() and serve_async()."""
    return str(request.param)


@pytest.fixture
def start_worker(mode: str) -> Iterator[object]:
    """``start_worker(*args)`` starts worker_app.py in this test's mode; all are killed at
    the end of the test if still running."""
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str) -> Worker:
        proc = spawn([str(WORKER_APP), mode, *args])
        procs.append(proc)
        return Worker(proc)

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@contextlib.contextmanager
def serving_in_thread(port: int | None = None, **options: Any) -> Iterator[list[int]]:
    """Runs ``portshare.serve`` (one-thread server, no signal handling, no parent watch, plus
    ``options``) on a thread; yields the ports it reported serving on once it has, then
    stops it and checks that it returned 0."""
    import portshare

    stop = threading.Event()
    served: list[int] = []
    result: list[int] = []
    args = () if port is None else (port,)

    def run() -> None:
        result.append(
            portshare.serve(
                portshare.server(max_workers=1),
                *args,
                stop_event=stop,
                on_serving=served.append,
                handle_signals=False,
                watch_parent=False,
                **options,
            )
        )

    thread = threading.Thread(target=run)
    thread.start()
    try:
        for _ in range(300):  # up to 30 s: poll, do not sleep a guess
            if served or not thread.is_alive():
                break
            thread.join(0.1)
        assert served, "serve() did not report serving"
        yield served
    finally:
        stop.set()
        thread.join(15)
    assert result == [0]
