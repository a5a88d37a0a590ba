#!/usr/bin/env bash
# Debian packages the project needs, installed once (idempotent: a package already present is skipped):
#   chromium, fonts-dejavu-core        the evaluator's report test renders the HTML report
#   containerd, runc                   the local nodes' container runtime (started by devcluster/, never as a service)
#   containernetworking-plugins        CNI bridge + host-local IPAM for pod networking (/usr/lib/cni)
#   iptables, conntrack                kube-proxy's Service rules and the bridge plugin's masquerade
#   mmdebstrap                         the local Debian base image (no registry is reachable)
#   docker.io                          dockerd + BuildKit to build the Dockerfiles (started by devcluster/scripts/build-images.sh)
#   gcc, libc6-dev                     the static pause binary of the pod sandbox image
# Needs root (or sudo) and Debian's apt.
set -euo pipefail

packages=(chromium fonts-dejavu-core containerd runc containernetworking-plugins iptables conntrack mmdebstrap
          docker.io gcc libc6-dev)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]} == 0)); then
  echo "system packages present (${#packages[@]})"
  exit 0
fi

SUDO=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "install-system-deps: not root and no sudo; install these Debian packages by hand: ${missing[*]}" >&2
    exit 1
  fi
fi
echo "installing Debian packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# Packages do not start services here (no systemd); the project's scripts start what they need.
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "installed: ${missing[*]}"
