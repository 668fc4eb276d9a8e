"""``python -m portshare ARGS...``: runs the ``portshare`` command from this wheel."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from ._find import find_executable


def main() -> int:
    """Runs portshare with this process's arguments; returns its exit code (Windows) or
    never returns (Unix: the process becomes portshare, so signals reach it directly)."""
    try:
        exe = find_executable()
    except FileNotFoundError as exc:
        print(f"portshare: {exc}", file=sys.stderr)
        return 127
    args = [exe, *sys.argv[1:]]
    if sys.platform != "win32":
        os.execv(exe, args)
    # Windows has no exec: run it as a child. Ctrl-C and Ctrl-Break reach both processes;
    # portshare drains, and this one waits for it instead of dying first.
    signal.signal(signal.SIGBREAK, signal.SIG_IGN)
    child = subprocess.Popen(args)
    while True:
        try:
            return child.wait()
        except KeyboardInterrupt:
            continue


if __name__ == "__main__":
    sys.exit(main())
