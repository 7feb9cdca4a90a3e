#!/bin/bash
# Stage 2 of the cgroup-v2 test VM, PID 1 after switch_root (see initramfs-init). It comes from
# the per-run disk (/lane), so editing it needs no image rebuild. It mounts only cgroup v2,
# runs pytest as root, then as the unprivileged user `sbxtest` inside a delegated cgroup
# subtree, and reports on the serial console with lines starting with "@@SBXVM " that
# cgroup2.sh parses. No `set -e`: whatever fails, we must reach the power-off.
set -u
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
lane=/lane
src=$lane/src
cgroot=/sys/fs/cgroup
venv=/opt/venv
user=sbxtest uid=1500

mark() { echo "@@SBXVM $*"; }
uptime_s() { local u; read -r u _ </proc/uptime; echo "${u%.*}"; }
halt() {
    sync
    mark "poweroff"
    echo o >/proc/sysrq-trigger
    sleep 60
}
trap halt EXIT

# --- the system a v2-only distribution boots into -------------------------------------------
mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mount -t devtmpfs -o nosuid devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts -o nosuid,noexec,gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /dev/shm
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /tmp
mount -t tmpfs -o nosuid,nodev,mode=755 tmpfs /run
# Only the unified hierarchy, with systemd's options; the kernel command line carries
# cgroup_no_v1=all, so no v1 hierarchy could be mounted even by a test.
mount -t cgroup2 -o nosuid,nodev,noexec,nsdelegate,memory_recursiveprot cgroup2 "$cgroot"
# systemd makes every mount shared; do the same so the runtime meets what real hosts have.
mount --make-rshared /
dmesg -n 1
hostname sbxvm
ip link set lo up
# Debian kernels have this switch (default on); make sure user namespaces are allowed.
[[ ! -w /proc/sys/kernel/unprivileged_userns_clone ]] || echo 1 >/proc/sys/kernel/unprivileged_userns_clone
modprobe overlay || mark "warning=modprobe overlay failed"
modprobe virtio_rng 2>/dev/null || true

readarray -d '' -t args <"$lane/args"
readarray -d '' -t lane_env <"$lane/env"
runs=() delegation=auto
while IFS='=' read -r k v; do
    case $k in
        runs) read -r -a runs <<<"$v" ;;
        delegation) delegation=$v ;;
    esac
done <"$lane/conf"

mark "kernel=$(uname -r)"
mark "fstype=$(stat -f -c %T "$cgroot")"
mark "controllers=$(<"$cgroot/cgroup.controllers")"
mark "cgroup-mounts=$(awk '$3 ~ /^cgroup/ { printf "%s%s on %s", sep, $3, $2; sep = ", " }' /proc/mounts)"
mark "overlay=$(grep -qw overlay /proc/filesystems && echo yes || echo no)"

# enable_path REL: create $cgroot/REL, enabling every available controller on the way down
# (the leaf itself gets them all in cgroup.controllers, none in its cgroup.subtree_control).
enable_path() {
    local cur=$cgroot part c parts
    IFS=/ read -r -a parts <<<"$1"
    for part in "${parts[@]}"; do
        [[ -n $part ]] || continue
        for c in $(<"$cur/cgroup.controllers"); do
            echo "+$c" >"$cur/cgroup.subtree_control" 2>/dev/null || mark "warning=cannot enable $c in $cur"
        done
        cur=$cur/$part
        mkdir -p "$cur"
    done
}

# --- the project ---------------------------------------------------------------------------
pythonpath=()
if ! "$venv/bin/pip" install --quiet --no-deps --no-build-isolation --no-index -e "$src" >/tmp/pip.log 2>&1; then
    cat /tmp/pip.log
    mark "warning=pip install -e failed, using PYTHONPATH=$src"
    pythonpath=("PYTHONPATH=$src")
fi
base_env=("PATH=$venv/bin:$PATH" "VIRTUAL_ENV=$venv" LANG=C.UTF-8 TERM=dumb PY_COLORS=0 COLUMNS=120
          "${pythonpath[@]}" "${lane_env[@]}")

# after_run RUN CGDIR: report the processes and cgroups that remain under the run's cgroup
# (information for the reader; the tests themselves judge what counts as a leak).
after_run() {
    local procs dirs
    procs=$(find "$2" -name cgroup.procs -exec cat {} + 2>/dev/null | wc -l)
    dirs=$(find "$2" -mindepth 1 -type d 2>/dev/null | sed "s|^$cgroot||" | tr '\n' ' ')
    mark "after $1 processes=$procs cgroups=${dirs:-none}"
}

run_root() {
    # Like a service started by systemd: its own cgroup, controllers available, no delegation
    # needed since it is root.
    local rel=system.slice/sandboxd-tests.service rc
    enable_path "$rel"
    mark "begin root cgroup=/$rel uptime=$(uptime_s)s"
    (
        echo "$BASHPID" >"$cgroot/$rel/cgroup.procs" || exit 3
        cd "$src" || exit 3
        exec env -i "${base_env[@]}" HOME=/root USER=root LOGNAME=root \
            "$venv/bin/python" -m pytest -p no:cacheprovider "${args[@]}" </dev/null
    )
    rc=$?
    mark "end root rc=$rc uptime=$(uptime_s)s"
    after_run root "$cgroot/$rel"
}

# delegate: give $user a cgroup subtree; sets $deleg (absolute path) and $how.
delegate() {
    deleg='' how=''
    local use_setup=$delegation
    if [[ $use_setup == auto ]]; then
        use_setup=chown
        ! "$venv/bin/python" -m sandboxd setup --help >/dev/null 2>&1 || use_setup=setup
    fi
    if [[ $use_setup == setup ]]; then
        how=setup
        "$venv/bin/python" -m sandboxd setup --user "$user"
        local rc=$?
        mark "setup rc=$rc"
        [[ $rc -eq 0 ]] || return 1
        # Whatever setup delegated: the topmost cgroup directory owned by the user.
        deleg=$(find "$cgroot" -mindepth 1 -maxdepth 8 -type d -uid "$uid" -printf '%d %p\n' |
            sort -n | head -n 1 | cut -d ' ' -f 2-)
        [[ -n $deleg ]] || { mark "error=sandboxd setup --user $user delegated no cgroup to the user"; return 1; }
    else
        # FALLBACK while `sandboxd setup --user NAME` does not exist yet (or when
        # SANDBOXD_VM_DELEGATION=chown asks for it): do by hand what
        # systemd's Delegate=yes does for user@1500.service (chown the directory and its
        # cgroup.procs, cgroup.threads, cgroup.subtree_control; controllers enabled above it).
        how=fallback-chown
        local rel=user.slice/user-$uid.slice/user@$uid.service
        enable_path "$rel"
        deleg=$cgroot/$rel
        chown "$uid:$uid" "$deleg" "$deleg/cgroup.procs" "$deleg/cgroup.threads" "$deleg/cgroup.subtree_control"
    fi
}

run_user() {
    local deleg how leaf rc f
    if ! delegate; then
        mark "begin user cgroup=none delegation=${how:-none}"
        mark "end user rc=3"
        return
    fi
    # A process may only sit in a cgroup that has no controllers enabled for its children.
    leaf=$deleg
    if [[ -n $(<"$deleg/cgroup.subtree_control") ]]; then
        leaf=$deleg/lane-tests
        mkdir -p "$leaf"
        for f in "$leaf" "$leaf/cgroup.procs" "$leaf/cgroup.threads" "$leaf/cgroup.subtree_control"; do
            chown "$uid:$uid" "$f"
        done
    fi
    mkdir -p "/run/user/$uid"
    chown "$uid:$uid" "/run/user/$uid"
    chmod 700 "/run/user/$uid"
    # The user owns the project tree (and what the root run wrote there).
    chown -R "$uid:$uid" "$src"
    mark "begin user cgroup=${leaf#"$cgroot"} delegation=$how uptime=$(uptime_s)s"
    (
        echo "$BASHPID" >"$leaf/cgroup.procs" || exit 3
        cd "$src" || exit 3
        exec setpriv --reuid="$uid" --regid="$uid" --init-groups \
            env -i "${base_env[@]}" HOME="/home/$user" USER="$user" LOGNAME="$user" \
            XDG_RUNTIME_DIR="/run/user/$uid" "$venv/bin/python" -m pytest -p no:cacheprovider "${args[@]}" </dev/null
    )
    rc=$?
    mark "end user rc=$rc uptime=$(uptime_s)s"
    after_run user "$deleg"
}

for r in "${runs[@]}"; do
    case $r in
        root) run_root ;;
        user) run_user ;;
    esac
done
mark "done"
