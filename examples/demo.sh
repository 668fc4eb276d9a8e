#!/usr/bin/env bash
# portshare's main job, for real: build it, install what the Python workers need (a venv
# under target/), let portshare start 4 Python gRPC workers on their own ports, and run a
# client whose calls visibly spread over them.
#
#   examples/demo.sh            # proxy on 127.0.0.1:21051, workers on 21052-21055
#   DEMO_PORT=23051 examples/demo.sh
#   DEMO_SOCKETS=1 examples/demo.sh   # workers on Unix sockets in target/demo-sockets
#
# Ports stay below 32768 so they never collide with the kernel's outgoing (ephemeral) ports.
set -euo pipefail
cd "$(dirname "$0")/.."

port=${DEMO_PORT:-21051}
workers=4
admin=$((port - 1))
venv=target/demo-venv
portshare_pid=

cleanup() {
    # SIGTERM: portshare drains, then stops its workers gracefully.
    if [ -n "$portshare_pid" ]; then
        kill -TERM "$portshare_pid" 2>/dev/null || true
        wait "$portshare_pid" 2>/dev/null || true
    fi
}
trap cleanup EXIT INT TERM

echo "== building portshare (release)"
cargo build --release --quiet

echo "== installing the Python gRPC packages the workers need (once, into $venv)"
requirements=examples/python/requirements.txt
if ! cmp -s "$requirements" "$venv/requirements.installed" 2>/dev/null; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
    cp "$requirements" "$venv/requirements.installed"
fi
py="$venv/bin/python"

echo "== portshare on 127.0.0.1:$port starts $workers workers (admin on 127.0.0.1:$admin)"
# The workers use the checkout's portshare helper (python/portshare; `pip install portshare`
# brings the same package along with the binary).
# DEMO_SOCKETS=1: each worker on a Unix socket of its own instead of a port (Linux, macOS).
if [ -n "${DEMO_SOCKETS:-}" ]; then
    place=(--worker-socket-dir "$PWD/target/demo-sockets" -- "$py" examples/python/server.py)
else
    place=(-- "$py" examples/python/server.py --port '{port}')
fi
PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}" target/release/portshare --listen "127.0.0.1:$port" --admin "127.0.0.1:$admin" \
    --workers "$workers" "${place[@]}" &
portshare_pid=$!

# Wait (bounded: 60 s) until portshare reports every worker ready.
"$py" - "$admin" "$workers" <<'PY'
import json, sys, time, urllib.request
admin, want = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/backends", timeout=2) as r:
            if sum(b["ready"] for b in json.load(r)) == want:
                sys.exit(0)
    except OSError:
        pass
    time.sleep(0.1)
sys.exit("the workers did not become ready within 60 s")
PY

echo "== 40 calls, each on a new client connection, through portshare"
"$py" examples/python/client.py --target "127.0.0.1:$port" --calls 40

echo "== portshare status"
target/release/portshare status --admin "127.0.0.1:$admin"
echo "== done; stopping portshare, which drains and then stops its workers"
