"""Pure logic: the port, the grace, the address, finding the executable."""

from __future__ import annotations

import os
import stat
import sys
import sysconfig
from pathlib import Path

import pytest

import portshare
from portshare import _find
from portshare._common import format_address, grace_seconds


def test_port_argument_wins_then_flag_then_environment() -> None:
    env = {"PORTSHARE_PORT": "7003"}
    assert portshare.resolve_port(7001, argv=["--port", "7002"], environ=env) == 7001
    assert portshare.resolve_port(argv=["-v", "--port", "7002"], environ=env) == 7002
    assert portshare.resolve_port(argv=["--port=7004"], environ=env) == 7004
    assert portshare.resolve_port(argv=[], environ=env) == 7003
    assert portshare.resolve_port(argv=["--port-range", "1"], environ=env) == 7003


def test_no_port_or_a_bad_one_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="run under portshare"):
        portshare.resolve_port(argv=[], environ={})
    with pytest.raises(ValueError, match="PORTSHARE_PORT: 'x' is not a port"):
        portshare.resolve_port(argv=[], environ={"PORTSHARE_PORT": "x"})
    with pytest.raises(ValueError, match="--port: 70000 is not a port"):
        portshare.resolve_port(argv=["--port", "70000"], environ={})
    with pytest.raises(ValueError, match="port argument"):
        portshare.resolve_port(-1)


def test_addresses_and_grace() -> None:
    assert format_address("127.0.0.1", 5) == "127.0.0.1:5"
    assert format_address("::", 5) == "[::]:5"
    assert format_address("[::1]", 5) == "[::1]:5"
    assert grace_seconds(None) is None
    with pytest.raises(ValueError):
        grace_seconds(-1)


def test_parent_watch_only_under_portshare() -> None:
    assert portshare.ParentWatch.from_environ({}) is None
    assert portshare.ParentWatch.from_environ({"PORTSHARE_PID": "nope"}) is None
    watch = portshare.ParentWatch.from_environ({"PORTSHARE_PID": str(os.getppid())})
    assert watch is not None and not watch.gone()


def _fake_exe(directory: Path) -> Path:
    exe = directory / ("portshare" + (sysconfig.get_config_var("EXE") or ""))
    exe.write_text("#!/bin/sh\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return exe


def test_find_executable_in_the_scripts_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exe = _fake_exe(tmp_path)
    monkeypatch.setattr(_find.sysconfig, "get_path", lambda *_a, **_k: str(tmp_path))
    assert portshare.find_executable() == str(exe)


def test_find_executable_says_where_it_looked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_find.sysconfig, "get_path", lambda *_a, **_k: str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(_find, "__file__", str(tmp_path / "pkg" / "portshare" / "_find.py"))
    with pytest.raises(FileNotFoundError, match="pip install portshare"):
        portshare.find_executable()


@pytest.mark.skipif(sys.platform == "win32", reason="a shell script stands in for the binary")
def test_python_dash_m_runs_the_executable_with_its_arguments(tmp_path: Path) -> None:
    import subprocess

    exe = _fake_exe(tmp_path)
    exe.write_text('#!/bin/sh\necho "args: $*"\nexit 3\n')
    env = dict(os.environ, PATH=str(tmp_path) + os.pathsep + os.environ.get("PATH", ""))
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    # Only PATH can hold the stand-in here: a scripts directory may hold a real portshare.
    code = (
        "import sys, portshare._find as f, portshare.__main__ as m;"
        f"f.find_executable = lambda: {str(exe)!r}; m.find_executable = f.find_executable;"
        "sys.argv = ['portshare', '--version', 'x y']; sys.exit(m.main())"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 3, done.stderr
    assert done.stdout == "args: --version x y\n"


def test_the_socket_portshare_gives_is_used_unless_a_port_is_asked_for() -> None:
    env = {"PORTSHARE_SOCKET": "/run/app/worker-0-0.sock"}
    assert portshare.resolve_socket(argv=[], environ=env) == "/run/app/worker-0-0.sock"
    assert portshare.resolve_socket(7001, argv=[], environ=env) is None
    assert portshare.resolve_socket(argv=["--port", "7002"], environ=env) is None
    assert portshare.resolve_socket(argv=["--port=7002"], environ=env) is None
    assert portshare.resolve_socket(argv=[], environ={"PORTSHARE_PORT": "7003"}) is None
    assert portshare.resolve_socket(argv=[], environ={"PORTSHARE_SOCKET": ""}) is None
