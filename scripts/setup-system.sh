#!/usr/bin/env bash
# Installs the Debian packages mortar and its tests use; idempotent (installs only what is missing).
set -euo pipefail

PACKAGES=(
  python3 python3-venv python3-dev gcc pkg-config   # the venv and packages that compile
  attr xfsprogs e2fsprogs util-linux iproute2 procps # bricks: xattrs, test file systems, loop devices, netns
  qemu-utils fio libnbd-bin                          # real clients the interop tests and benchmarks drive
  fuse3 libfuse3-dev                                 # the FUSE mount
  lvm2                                               # the LVM2 backend of storage/bd
  etcd-server etcd-client                            # the configuration store of multi-node pools
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "setup: missing system packages (${missing[*]}); run as root or install them" >&2
  exit 1
fi
echo "setup: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
