#!/usr/bin/env python3
"""Cross-checks of the deploy/ recipes that no linter makes, run by deploy/check.sh.

- every YAML file parses (compose.yaml has no engine-free validator here);
- the stop timeouts line up: each orchestrator waits longer before SIGKILL than portshare's
  drain plus the workers' stop grace (plus any preStop delay), as the recipes' comments say;
- every port the recipes use lies below 32768, where Linux's ephemeral range starts.

Prints one line per check ("ok ..." or "FAIL ...") and exits 1 if any failed.
Usage: check_recipes.py REPO_ROOT
"""

import re
import sys
from pathlib import Path

import yaml

# portshare's defaults (README.md): used where a recipe leaves them unset.
DRAIN_DEFAULT = 30.0
STOP_GRACE_DEFAULT = 10.0
EPHEMERAL_START = 32768

failures = 0


def report(ok, what, detail=""):
    global failures
    if not ok:
        failures += 1
    print(f"{'ok  ' if ok else 'FAIL'}  {what}{': ' + detail if detail else ''}")


def seconds(text):
    """'45s', '1m', '500ms', '1m30s' or a bare number of seconds."""
    text = str(text).strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a duration: {text!r}")
    return sum(float(n) * units[u] for n, u in parts)


def flag(args, name):
    """The value after `name` in an argument list, stopping at `--` (the worker command)."""
    args = list(args)
    if "--" in args:
        args = args[: args.index("--")]
    for i, arg in enumerate(args[:-1]):
        if arg == name:
            return args[i + 1]
    return None


def env_value(env, name):
    if isinstance(env, dict):
        return env.get(name)
    for item in env or []:
        if item.get("name") == name:
            return item.get("value")
    return None


def ports_in(address):
    """Ports of HOST:PORT or HOST:P1-P2 (or a bare port)."""
    m = re.search(r"(\d+)(?:-(\d+))?$", str(address))
    if not m:
        return []
    first, last = int(m.group(1)), int(m.group(2) or m.group(1))
    return list(range(first, last + 1))


def check_ports(what, ports):
    high = sorted({p for p in ports if p >= EPHEMERAL_START})
    report(not high, f"{what}: ports below {EPHEMERAL_START}",
           f"{high} lie in the ephemeral range" if high else "")


def pre_stop_sleep(container):
    command = (container.get("lifecycle", {}).get("preStop", {})
               .get("exec", {}).get("command", []))
    return float(command[1]) if len(command) == 2 and command[0] == "sleep" else 0.0


def portshare_timing(container):
    """(drain, stop grace or 0 without spawned workers, ports) of a portshare container."""
    args = container.get("args", [])
    env = container.get("env", [])
    drain = seconds(flag(args, "--drain-timeout")
                    or env_value(env, "PORTSHARE_DRAIN_TIMEOUT") or DRAIN_DEFAULT)
    spawns = flag(args, "--workers") is not None
    grace = (seconds(env_value(env, "PORTSHARE_WORKERS__STOP_GRACE") or STOP_GRACE_DEFAULT)
             if spawns else 0.0)
    ports = [p for name in ("--listen", "--admin", "--backend")
             for p in ports_in(flag(args, name) or "")]
    if spawns:
        listen = ports_in(flag(args, "--listen"))[0]
        base = int(flag(args, "--worker-port-base") or listen + 1)
        ports += range(base, base + int(flag(args, "--workers")))
    return drain, grace, ports


def check_kubernetes(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    name = path.relative_to(ROOT)
    for doc in docs:
        if doc["kind"] != "Deployment":
            continue
        spec = doc["spec"]["template"]["spec"]
        budget = float(spec.get("terminationGracePeriodSeconds", 30))
        containers = spec.get("initContainers", []) + spec["containers"]
        portshare = [c for c in containers if c.get("command", [None])[0] == "portshare"]
        others = [c for c in containers if c not in portshare]
        ports = [p["containerPort"] for c in containers for p in c.get("ports", [])]
        need = 0.0
        for c in portshare:
            drain, grace, used = portshare_timing(c)
            ports += used
            # A sidecar is stopped after the app containers, so their preStop comes first.
            need = max(need, pre_stop_sleep(c) + drain + grace
                       + max([pre_stop_sleep(o) for o in others], default=0.0))
        report(budget > need, f"{name}: terminationGracePeriodSeconds {budget:g}s"
               f" > preStop + drain + stop grace {need:g}s")
        for c in others:
            # The sidecar example starts workers on literal ports in a shell loop.
            script = " ".join(c.get("args", []) + c.get("command", []))
            ports += [int(p) for p in re.findall(r"\b(\d{4,5})\b", script)]
        check_ports(str(name), ports)


def check_compose(path):
    doc = yaml.safe_load(path.read_text())
    name = path.relative_to(ROOT)
    service = doc["services"]["portshare"]
    build = service["build"]
    dockerfile = (path.parent / build["context"] / build["dockerfile"]).resolve()
    report(dockerfile.is_file(), f"{name}: build names an existing Dockerfile",
           "" if dockerfile.is_file() else f"{dockerfile} is missing")
    test = service["healthcheck"]["test"]
    report(test[:3] == ["CMD", "portshare", "probe"], f"{name}: healthcheck uses portshare probe")
    env = service.get("environment", {})
    need = (seconds(env.get("PORTSHARE_DRAIN_TIMEOUT", DRAIN_DEFAULT))
            + seconds(env.get("PORTSHARE_WORKERS__STOP_GRACE", STOP_GRACE_DEFAULT)))
    budget = seconds(service["stop_grace_period"])
    report(budget > need, f"{name}: stop_grace_period {budget:g}s > drain + stop grace {need:g}s")
    ports = [int(p) for spec in service.get("ports", [])
             for p in str(spec).split(":")[-2:] if p.isdigit()]
    check_ports(str(name), ports)


def check_systemd(path):
    name = path.relative_to(ROOT)
    text = path.read_text()
    m = re.search(r"^TimeoutStopSec=(\S+)", text, re.M)
    budget = seconds(m.group(1)) if m else 90.0
    need = DRAIN_DEFAULT + STOP_GRACE_DEFAULT
    report(budget > need, f"{name}: TimeoutStopSec {budget:g}s > default drain + stop grace {need:g}s")
    report(re.search(r"^KillMode=mixed$", text, re.M) is not None,
           f"{name}: KillMode=mixed (SIGTERM to portshare alone; it stops the workers)")


def main():
    for path in sorted(ROOT.glob("deploy/**/*.yaml")) + sorted(ROOT.glob(".github/workflows/*.yml")):
        try:
            list(yaml.safe_load_all(path.read_text()))
            report(True, f"{path.relative_to(ROOT)}: YAML parses")
        except yaml.YAMLError as err:
            report(False, f"{path.relative_to(ROOT)}: YAML parses", str(err).replace("\n", " "))
    for check, path in ((check_compose, "deploy/compose.yaml"),
                        (check_kubernetes, "deploy/kubernetes/entrypoint.yaml"),
                        (check_kubernetes, "deploy/kubernetes/sidecar.yaml"),
                        (check_systemd, "deploy/systemd/portshare.service")):
        try:
            check(ROOT / path)
        except (KeyError, IndexError, TypeError, ValueError, yaml.YAMLError) as err:
            report(False, f"{path}: readable by {check.__name__}", f"{type(err).__name__}: {err}")
    return 1 if failures else 0


ROOT = Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve()

if __name__ == "__main__":
    sys.exit(main())
