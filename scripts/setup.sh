#!/usr/bin/env bash
# Installs what basin needs on this machine from Debian's packages, saying what
# it installs. Safe to run again: it installs only what is missing.
set -euo pipefail

# Packages the platform and its tests use (ARCHITECTURE.md, "Dependencies").
PACKAGES=(containerd runc containernetworking-plugins iptables iproute2 busybox-static)

missing=()
for p in "${PACKAGES[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
	exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
	echo "basin setup: missing Debian packages: ${missing[*]} (run as root to install them)" >&2
	exit 1
fi
echo "basin setup: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
