#!/bin/bash
# Install what the project, its demo and its tests need on Debian 12 (as root), and
# the project itself into ./.venv. Idempotent: a second run only checks. As a normal user it
# only reports missing Debian packages and sets up ./.venv.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  python3 python3-venv python3-dev gcc
  containerd runc
  docker-registry skopeo umoci apache2-utils
  golang-go golang-github-containerd-containerd-dev golang-github-gotestyourself-gotest.tools-dev
  podman fuse-overlayfs fuse3 libfuse2
  busybox-static
  debootstrap
  ca-certificates
  # Programs tests run directly: curl (a TLS registry's readiness), openssl (its certificate),
  # systemd-analyze (the units' check; nothing is started).
  curl openssl systemd
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})) && ((EUID != 0)); then
  # A normal user (the fast tier) cannot install; tests needing these skip with the reason.
  echo "setup.sh: not root, so not installing: ${missing[*]}" >&2
elif ((${#missing[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update
  # With recommends: the configuration every test here ran against.
  apt-get install -y "${missing[@]}"
fi

# The packages start nothing here (no systemd); tests and the demo run their own instances.
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# pip's build chatter goes to a log, shown only when something fails. editable_mode=compat:
# a plain path in a .pth instead of an import hook that costs every command ~8 ms at start.
log=$(mktemp)
if ! { .venv/bin/python -m pip install --quiet --upgrade pip &&
       .venv/bin/python -m pip install --quiet -e '.[test,zstd,fast-gzip]' --config-settings editable_mode=compat; } >"$log" 2>&1; then
  cat "$log" >&2
  rm -f "$log"
  exit 1
fi
rm -f "$log"
