#!/bin/bash
# Build the cgroup-v2 test VM: a Debian kernel, a busybox initramfs that loads the virtio
# modules, and an ext4 root filesystem with Python, the project's dependencies in /opt/venv and
# an unprivileged user. Called by cgroup2.sh, which owns the cache key, as:
#   build-image.sh OUTDIR KERNEL_PACKAGE REQUIREMENTS_FILE
# OUTDIR must not exist; on success it holds vmlinuz, initrd.img, root.img and manifest.txt.
# Needs root (mmdebstrap in root mode, chroot), Debian's mirror and PyPI. No loop mounts.
set -euo pipefail

out=$1 kpkg=$2 reqs=$3
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
suite=${SANDBOXD_VM_SUITE:-bookworm}
mirror=${SANDBOXD_VM_MIRROR:-http://deb.debian.org/debian}
security=${SANDBOXD_VM_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
# Free space left in the root filesystem for the tests (the root disk is a copy-on-write
# snapshot at run time, so the cached image itself never changes).
headroom_mb=${SANDBOXD_VM_ROOT_HEADROOM_MB:-2048}

log() { printf '[vm-build] %s\n' "$*" >&2; }

mkdir "$out"
out=$(cd "$out" && pwd)
cd "$out"

# --- kernel -------------------------------------------------------------------------------
log "kernel: apt-get download $kpkg"
mkdir deb kernel
(cd deb && apt-get download -q "$kpkg" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2 || true)
debs=(deb/*.deb)
[[ -f ${debs[0]} ]] || { log "apt-get download $kpkg failed"; exit 1; }
dpkg -x "${debs[0]}" kernel
kvers=(kernel/lib/modules/*)
[[ ${#kvers[@]} -eq 1 && -d ${kvers[0]} ]] || { log "expected one module tree in $kpkg"; exit 1; }
kver=${kvers[0]##*/}
cp "kernel/boot/vmlinuz-$kver" vmlinuz

# --- root filesystem ----------------------------------------------------------------------
packages=()
while read -r line; do
    line=${line%%#*}
    for p in $line; do packages+=("$p"); done
done <"$here/packages.txt"
include=$(IFS=,; echo "${packages[*]}")

cp "$reqs" requirements.txt
log "rootfs: mmdebstrap $suite (${#packages[@]} packages) + pip install -r requirements.txt"
# rootfs-hook.sh runs on the host with the new root as $1; it reads these:
export SBXVM_KERNEL_TREE="$out/kernel/lib/modules/$kver" SBXVM_KVER="$kver"
export SBXVM_REQUIREMENTS="$out/requirements.txt" SBXVM_MANIFEST="$out/manifest.txt"
mmdebstrap --quiet --mode=root --variant=minbase --include="$include" \
    --customize-hook="$here/rootfs-hook.sh" \
    "$suite" rootfs \
    "deb $mirror $suite main" \
    "deb $mirror $suite-updates main" \
    "deb $security $suite-security main"

# --- initramfs: busybox-static + the modules needed to reach the virtio disks --------------
# Dependencies come from the modules.dep that depmod wrote into the root filesystem.
log "initramfs: busybox + virtio modules of $kver"
bb=/bin/busybox
dpkg -s busybox-static >/dev/null 2>&1 || { log "busybox-static is not installed"; exit 1; }
mdir="rootfs/usr/lib/modules/$kver"
mkdir -p initramfs/bin initramfs/modules initramfs/proc initramfs/sys initramfs/dev initramfs/newroot
cp "$bb" initramfs/bin/busybox
cp "$here/initramfs-init" initramfs/init
chmod 755 initramfs/init
declare -A seen=()
order=()
resolve() {  # resolve RELPATH: append RELPATH after its dependencies to $order
    local rel=$1 deps i
    [[ -z ${seen[$rel]+x} ]] || return 0
    seen[$rel]=1
    read -r -a deps < <(awk -v m="$rel:" '$1 == m { $1 = ""; print }' "$mdir/modules.dep")
    for ((i = ${#deps[@]} - 1; i >= 0; i--)); do resolve "${deps[i]}"; done
    order+=("$rel")
}
for name in virtio_pci virtio_blk; do
    rel=$(awk -v n="$name" '{ f = $1; sub(/:$/, "", f); b = f; sub(/.*\//, "", b);
          sub(/\.ko(\.xz|\.zst|\.gz)?$/, "", b); gsub(/-/, "_", b); if (b == n) { print f; exit } }' \
          "$mdir/modules.dep")
    if [[ -n $rel ]]; then
        resolve "$rel"
    elif grep -q "/$name\.ko" "$mdir/modules.builtin"; then
        log "  $name is built in"
    else
        log "module $name not found for $kver"; exit 1
    fi
done
n=0
for rel in "${order[@]}"; do
    n=$((n + 1))
    dst=$(printf 'initramfs/modules/%02d-%s' "$n" "${rel##*/}")
    case $rel in
        *.ko.xz) xz -dc "$mdir/$rel" >"${dst%.xz}" ;;
        *.ko.zst) zstd -qdc "$mdir/$rel" >"${dst%.zst}" ;;
        *.ko.gz) gzip -dc "$mdir/$rel" >"${dst%.gz}" ;;
        *.ko) cp "$mdir/$rel" "$dst" ;;
        *) log "unknown module format: $rel"; exit 1 ;;
    esac
    log "  module $n: ${rel##*/}"
done
(cd initramfs && find . -print0 | sort -z | "$bb" cpio -o -H newc -0 -R 0:0 2>/dev/null) >initrd.img

# --- root disk image ----------------------------------------------------------------------
used_mb=$(du -sm rootfs | cut -f1)
size_mb=$((used_mb + used_mb / 4 + headroom_mb))
log "root.img: ext4 ${size_mb} MiB from ${used_mb} MiB of files"
truncate -s "${size_mb}M" root.img
mke2fs -q -F -t ext4 -L sbxvm-root -m 0 -d rootfs root.img

{
    echo "kernel $kpkg $kver"
    echo "suite $suite"
    echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) root.img ${size_mb}MiB"
} >>manifest.txt
rm -rf deb kernel rootfs initramfs requirements.txt
log "done: $out"
