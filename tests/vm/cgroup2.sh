#!/bin/bash
# The cgroup-v2 test lane: boot a Debian kernel under QEMU (TCG) with only cgroup v2 mounted,
# put the current working tree in it, and run pytest there as root and then as an unprivileged
# user with a delegated cgroup subtree.
#
#   tests/vm/cgroup2.sh [PYTEST ARGS...]      default: tests/runtime tests/images tests/judge tests/test_rootless.py tests/test_serve.py tests/api
#
# Exit status: the worse of the two pytest runs; 124 when the watchdog killed the VM; 125 when
# the lane itself failed (image build, boot, missing report). See tests/vm/README.md for the
# environment variables.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${SANDBOXD_VM_CACHE:-/var/cache/sandboxd-vm}
watchdog=${SANDBOXD_VM_TIMEOUT:-2400}
mem=${SANDBOXD_VM_MEMORY:-4096}
cpus=${SANDBOXD_VM_CPUS:-2}
# The guest CPU model (qemu -cpu); tests/vm/README.md says why `max` is kept.
cpu_model=${SANDBOXD_VM_CPU:-max}
runs=${SANDBOXD_VM_RUNS:-root user}
delegation=${SANDBOXD_VM_DELEGATION:-auto}
quiet=${SANDBOXD_VM_QUIET:-0}
suite=${SANDBOXD_VM_SUITE:-bookworm}
mirror=${SANDBOXD_VM_MIRROR:-http://deb.debian.org/debian}
security=${SANDBOXD_VM_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
export SANDBOXD_VM_SUITE=$suite SANDBOXD_VM_MIRROR=$mirror SANDBOXD_VM_SECURITY_MIRROR=$security

say() { printf '[cgroup2-vm] %s\n' "$*" >&2; }
die() { say "error: $*"; exit 125; }
[[ $watchdog =~ ^[0-9]+$ && $mem =~ ^[0-9]+$ && $cpus =~ ^[0-9]+$ ]] ||
    die "SANDBOXD_VM_TIMEOUT, SANDBOXD_VM_MEMORY and SANDBOXD_VM_CPUS must be integers"
[[ $cpu_model =~ ^[A-Za-z0-9][A-Za-z0-9_.,=+-]*$ ]] || die "SANDBOXD_VM_CPU: not a qemu -cpu value: $cpu_model"

if (($# == 0)); then
    for t in tests/runtime tests/images tests/judge tests/test_rootless.py tests/test_serve.py tests/api; do
        if [[ -e $repo/$t ]]; then set -- "$@" "$t"; else say "warning: default test path $t does not exist, skipped"; fi
    done
    (($#)) || die "none of the default test paths exists"
fi

start=$SECONDS
tmp=$(mktemp -d "${TMPDIR:-/var/tmp}/sandboxd-vm.XXXXXX")
qpid='' tailpid='' building=''
cleanup() {
    local rc=$?
    if [[ -n $qpid ]] && kill -0 "$qpid" 2>/dev/null; then
        kill -TERM "$qpid" 2>/dev/null || true
        wait "$qpid" 2>/dev/null || true
    fi
    if [[ -n $tailpid ]] && kill -0 "$tailpid" 2>/dev/null; then
        kill "$tailpid" 2>/dev/null || true
        wait "$tailpid" 2>/dev/null || true
    fi
    [[ -z $building ]] || rm -rf "$building"
    rm -rf "$tmp"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

need() {  # need PACKAGE COMMAND...: apt-get install PACKAGE when a command is missing
    local pkg=$1 c
    shift
    for c in "$@"; do
        command -v "$c" >/dev/null 2>&1 && continue
        ((EUID == 0)) || die "$c is missing (Debian package $pkg)"
        say "installing $pkg"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$pkg" >&2 || die "apt-get install $pkg failed"
        return
    done
}
need qemu-system-x86 qemu-system-x86_64
need e2fsprogs mke2fs
need python3 python3
need git git

# --- the image: cache key from every input ---------------------------------------------------
# Python requirements: the build backend, the dependencies and the `test` extra of pyproject.toml.
python3 - "$repo/pyproject.toml" >"$tmp/requirements.txt" <<'EOF'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    p = tomllib.load(f)
reqs = list(p.get("build-system", {}).get("requires", [])) + ["wheel"]
reqs += p["project"].get("dependencies", [])
reqs += p["project"].get("optional-dependencies", {}).get("test", [])
print("\n".join(reqs))
EOF

kpkg=${SANDBOXD_VM_KERNEL_PKG:-}
if [[ -z $kpkg ]]; then
    # The kernel that Debian's cloud meta-package points at (virtio drivers, small).
    kpkg=$(apt-cache show --no-all-versions linux-image-cloud-amd64 2>/dev/null |
        sed -n 's/^Depends: \(linux-image-[^ ,]*\).*/\1/p' | head -n 1) || true
fi
kver=''
[[ -z $kpkg ]] || kver=$(apt-cache show --no-all-versions "$kpkg" 2>/dev/null | sed -n 's/^Version: //p' | head -n 1) || true

mkdir -p "$cache"
if [[ -n $kver ]]; then
    key=$({
        printf '%s\n' "suite=$suite" "mirror=$mirror" "security=$security" "kernel=$kpkg=$kver"
        cat "$tmp/requirements.txt"
        for f in packages.txt build-image.sh rootfs-hook.sh initramfs-init; do
            printf '%s %s\n' "$f" "$(sha256sum <"$here/$f" | cut -c1-64)"
        done
    } | sha256sum | cut -c1-16)
    img=$cache/img-$key
else
    # No apt lists (apt-get update never ran): reuse the newest image, if there is one.
    img=$(find "$cache" -maxdepth 1 -name 'img-*' -type d -printf '%T@ %p\n' 2>/dev/null |
        sort -rn | head -n 1 | cut -d ' ' -f 2-)
    [[ -n $img ]] || die "cannot resolve the kernel package (run apt-get update) and no cached image"
    say "warning: cannot resolve the kernel package (apt lists missing?); reusing $img"
fi

if [[ ! -f $img/root.img ]]; then
    ((EUID == 0)) || die "building the VM image needs root"
    need mmdebstrap mmdebstrap
    if ! dpkg -s busybox-static >/dev/null 2>&1; then  # the initramfs needs the static build
        say "installing busybox-static"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q busybox-static >&2 || die "apt-get install busybox-static failed"
    fi
    need xz-utils xz
    exec 9>"$cache/.lock"
    flock 9
    if [[ ! -f $img/root.img ]]; then
        say "building VM image ${img##*/} (kernel $kpkg $kver); log in $cache/build.log"
        t0=$SECONDS
        building=$cache/.building-${img##*/}-$$
        if ! "$here/build-image.sh" "$building" "$kpkg" "$tmp/requirements.txt" >"$cache/build.log" 2>&1; then
            tail -n 40 "$cache/build.log" >&2
            die "image build failed (see $cache/build.log)"
        fi
        mv "$building" "$img"
        building=''
        say "image built in $((SECONDS - t0)) s"
        # Older images (other keys) go; a run that already started keeps its open files.
        find "$cache" -mindepth 1 -maxdepth 1 -type d \( -name 'img-*' -o -name '.building-*' \) \
            ! -path "$img" -exec rm -rf {} +
    fi
    exec 9>&-
else
    say "reusing VM image ${img##*/}"
fi

# --- the run disk: the working tree, the pytest argv, the environment ------------------------
mkdir -p "$tmp/disk/src"
if git -C "$repo" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    # Tracked and untracked-but-not-ignored files, as they are now (deleted ones skipped).
    git -C "$repo" ls-files -co --exclude-standard -z |
        while IFS= read -r -d '' f; do
            if [[ -e $repo/$f || -L $repo/$f ]]; then printf '%s\0' "$f"; fi
        done >"$tmp/files"
    tar -C "$repo" --null -T "$tmp/files" -cf - | tar -C "$tmp/disk/src" -xf -
else
    tar -C "$repo" --exclude=.git -cf - . | tar -C "$tmp/disk/src" -xf -
fi
[[ -f $tmp/disk/src/tests/vm/guest.sh ]] || die "tests/vm/guest.sh is not in the copied tree"
# Test paths given as absolute host paths: inside the repo they map to /lane/src/...; outside
# it (e.g. a scratch test file) they are copied to /lane/host/<same path>.
args=()
for a in "$@"; do
    p=${a%%::*}
    rest=${a:${#p}}
    if [[ $p == /* && -e $p ]]; then
        p=$(realpath -s "$p")
        if [[ $p == "$repo" || $p == "$repo"/* ]]; then
            a=/lane/src${p#"$repo"}$rest
        else
            mkdir -p "$tmp/disk/host$(dirname "$p")"
            cp -a "$p" "$tmp/disk/host$p"
            a=/lane/host$p$rest
        fi
    fi
    args+=("$a")
done
printf '%s\0' "${args[@]}" >"$tmp/disk/args"
{
    printf '%s\0' "SANDBOXD_TEST_LANE=cgroup2-vm"
    for v in CI PYTEST_ADDOPTS ${SANDBOXD_VM_PASS_ENV:-}; do
        [[ $v =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "bad variable name in SANDBOXD_VM_PASS_ENV: $v"
        [[ -z ${!v+x} ]] || printf '%s\0' "$v=${!v}"
    done
} >"$tmp/disk/env"
for r in $runs; do [[ $r == root || $r == user ]] || die "SANDBOXD_VM_RUNS: unknown run '$r' (root, user)"; done
[[ $delegation =~ ^(auto|setup|chown)$ ]] || die "SANDBOXD_VM_DELEGATION must be auto, setup or chown"
printf '%s\n' "runs=$runs" "delegation=$delegation" >"$tmp/disk/conf"
disk_mb=$(($(du -sm "$tmp/disk" | cut -f1) * 2 + 256))
truncate -s "${disk_mb}M" "$tmp/run.img"
mke2fs -q -F -t ext4 -L sbxvm-run -m 0 -d "$tmp/disk" "$tmp/run.img"
rm -rf "$tmp/disk"

# --- boot ------------------------------------------------------------------------------------
log=$tmp/console.log
: >"$log"
say "booting (TCG, -cpu ${cpu_model}, ${cpus} vCPUs, ${mem} MiB, watchdog ${watchdog} s): pytest $*"
cmdline="console=ttyS0,115200 panic=-1 quiet loglevel=1 mitigations=off"
cmdline+=" cgroup_no_v1=all systemd.unified_cgroup_hierarchy=1"
qemu=(qemu-system-x86_64 -accel tcg,thread=multi -cpu "$cpu_model" -m "$mem" -smp "$cpus"
    -nodefaults -display none -monitor none -no-reboot -nic none
    -serial "file:$log"
    -kernel "$img/vmlinuz" -initrd "$img/initrd.img" -append "$cmdline"
    -drive "file=$img/root.img,format=raw,if=virtio,snapshot=on"
    -drive "file=$tmp/run.img,format=raw,if=virtio"
    -object rng-random,id=rng0,filename=/dev/urandom -device virtio-rng-pci,rng=rng0)
boot=$SECONDS
# snapshot=on keeps the cached root image untouched; qemu puts the overlay in $TMPDIR.
TMPDIR=$tmp timeout --kill-after=20 "$watchdog" "${qemu[@]}" </dev/null &
qpid=$!
if [[ $quiet != 1 ]]; then
    tail -n +1 -f --pid="$qpid" "$log" | sed -u 's/\r$//' >&2 &
    tailpid=$!
fi
qrc=0
wait "$qpid" || qrc=$?
qpid=''
if [[ -n $tailpid ]]; then
    wait "$tailpid" 2>/dev/null || true
    tailpid=''
fi
vm_s=$((SECONDS - boot))
tr -d '\r' <"$log" >"$cache/last-console.log" || true

# --- report ----------------------------------------------------------------------------------
con=$cache/last-console.log
field() { sed -n "s/^@@SBXVM $1=//p" "$con" | tail -n 1; }
summary() {  # summary RUN: pytest's closing line between the run's begin and end markers
    awk -v run="$1" '
        $0 ~ "^@@SBXVM begin " run "( |$)" { on = 1; next }
        $0 ~ "^@@SBXVM end " run " " { on = 0 }
        on && /(passed|failed|error|errors|skipped|deselected|xfailed|xpassed|no tests ran).* in [0-9.]+s/ { line = $0 }
        END { print line }' "$con"
}
echo "== cgroup2 VM lane: kernel $(field kernel); the VM ran ${vm_s} s, the lane $((SECONDS - start)) s =="
fstype=$(field fstype)
echo "fs type of /sys/fs/cgroup: ${fstype:-?}"
echo "controllers: $(field controllers)"
echo "cgroup mounts: $(field cgroup-mounts)"
grep '^@@SBXVM \(warning=\|error=\|setup \|after \)' "$con" | sed 's/^@@SBXVM /note: /' || true

worst=0
if ((qrc == 124 || qrc == 137)); then
    echo "watchdog: the VM ran longer than ${watchdog} s and was killed"
    worst=124
fi
[[ $fstype == cgroup2fs ]] || { echo "lane error: /sys/fs/cgroup is not cgroup2fs"; ((worst)) || worst=125; }
for r in $runs; do
    begin=$(sed -n "s/^@@SBXVM begin $r //p" "$con" | tail -n 1 | sed 's/ uptime=[0-9]*s//')
    rc=$(sed -n "s/^@@SBXVM end $r rc=\([0-9]*\).*/\1/p" "$con" | tail -n 1)
    line=$(summary "$r")
    if [[ -z $rc ]]; then
        echo "$r: no result (the VM stopped before this run ended)"
        ((worst)) || worst=125
        continue
    fi
    echo "$r [$begin]: ${line:-no pytest summary line} (pytest exit $rc)"
    ((worst >= 124 || rc <= worst)) || worst=$rc
done
if ((worst)); then
    echo "cgroup2 VM lane FAILED (exit $worst); console log: $con"
else
    echo "cgroup2 VM lane passed"
fi
exit "$worst"
