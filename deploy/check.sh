#!/usr/bin/env bash
# Checks the deployment recipes in deploy/ without a container engine, a cluster or a
# running systemd, and without network access at run time except PyPI for the first install:
#
#   bash deploy/check.sh
#
# - hadolint on deploy/Dockerfile (it cannot be built here: no Docker engine);
# - kubernetes-validate --strict on the Kubernetes manifests, against the oldest Kubernetes
#   they claim (1.29: native sidecars on by default) and the newest the pinned package knows.
#   The schemas ship inside the package, so nothing is downloaded while validating;
# - systemd-analyze verify on the unit, where systemd-analyze exists;
# - deploy/check_recipes.py: every YAML file parses (compose.yaml too, or `docker compose
#   config` where that plugin is installed), stop timeouts line up, ports stay below 32768.
#
# The tools are pinned in deploy/requirements.txt and installed once into target/deploy-venv;
# later runs reuse it (a changed requirements file rebuilds it). One line per check; exit 1
# if any check failed.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/deploy-venv
requirements=deploy/requirements.txt
kubernetes_versions=(1.29.0 1.37.0)

# --- tools -------------------------------------------------------------------------------
# The stamp is a copy of the requirements the venv was built from: reuse it while they match.
# (A venv whose Python has gone away, e.g. after an upgrade, is rebuilt too.)
if ! cmp -s "$requirements" "$venv/requirements.installed" 2>/dev/null \
    || ! "$venv/bin/python" -c 'import kubernetes_validate, yaml' 2>/dev/null; then
    echo "setting up $venv from $requirements"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
    cp "$requirements" "$venv/requirements.installed"
fi
py="$venv/bin/python"

failed=0
# run LABEL COMMAND...: one line for the check; the command's output only if it failed.
run() {
    local label=$1 out
    shift
    if out=$("$@" 2>&1); then
        echo "ok    $label"
    else
        echo "FAIL  $label"
        printf '%s\n' "$out" | sed 's/^/      /'
        failed=1
    fi
}

# --- Dockerfile --------------------------------------------------------------------------
# hadolint's default failure threshold is "info": any finding fails. Deliberate exceptions
# are written next to the line they concern (# hadolint ignore=DLxxxx, with the reason).
run "hadolint $("$venv/bin/hadolint" --version | awk '{print $NF}'): deploy/Dockerfile" \
    "$venv/bin/hadolint" --no-color deploy/Dockerfile

# --- Kubernetes --------------------------------------------------------------------------
for manifest in deploy/kubernetes/entrypoint.yaml deploy/kubernetes/sidecar.yaml; do
    for version in "${kubernetes_versions[@]}"; do
        run "kubernetes-validate --strict (Kubernetes $version): $manifest" \
            "$venv/bin/kubernetes-validate" --strict --quiet --kubernetes-version "$version" "$manifest"
    done
done

# --- systemd -----------------------------------------------------------------------------
# verify checks that every Exec*= program exists; portshare is not installed here, so the
# unit is verified as a copy whose /usr/local/bin/portshare points at a stand-in. verify
# exits 0 even for unknown keys or bad values (it only warns), so any line it prints about
# the unit counts as a failure.
verify_unit() {
    local unit=$1 dir out
    dir=$(mktemp -d)
    printf '#!/bin/sh\nexit 0\n' >"$dir/portshare"
    chmod +x "$dir/portshare"
    sed "s#/usr/local/bin/portshare#$dir/portshare#g" "$unit" >"$dir/portshare.service"
    local status=0
    out=$(systemd-analyze verify --man=no "$dir/portshare.service" 2>&1) || status=$?
    rm -rf "$dir"
    out=$(printf '%s\n' "$out" | grep 'portshare' || true)
    if [ "$status" -ne 0 ] || [ -n "$out" ]; then
        printf '%s\n' "$out"
        return 1
    fi
}
if command -v systemd-analyze >/dev/null; then
    run "systemd-analyze verify ($(systemd-analyze --version | head -n1)): deploy/systemd/portshare.service" \
        verify_unit deploy/systemd/portshare.service
else
    echo "skip  systemd-analyze verify: systemd-analyze is not installed"
fi

# --- compose -----------------------------------------------------------------------------
# `docker compose config` validates against the compose schema without an engine; most
# machines here have no compose plugin, and then check_recipes.py parses it as YAML.
if docker compose version >/dev/null 2>&1; then
    run "docker compose config: deploy/compose.yaml" \
        docker compose -f deploy/compose.yaml config --quiet
else
    echo "skip  docker compose config: the docker compose plugin is not installed (YAML checked below)"
fi

# --- cross-checks ------------------------------------------------------------------------
"$py" deploy/check_recipes.py . || failed=1

if [ "$failed" -ne 0 ]; then
    echo "deploy/check.sh: FAILED (see the FAIL lines above)"
    exit 1
fi
echo "deploy/check.sh: all checks passed"
