#!/usr/bin/env bash
# Set up and run the whole test suite, the way CI does.
#   tests/run.sh [pytest args]
# As root it runs two lanes: once as root, then once rootless for real as an unprivileged
# user (created here, delegated cgroups with `sandboxd setup --user`). As any other user it
# runs the rootless lane as that user (after root ran `sandboxd setup --user $USER` once).
# Exit status: 0 only when every lane's pytest exited 0 (so "no tests collected", pytest's 5,
# fails) and, under CI, nothing was left behind (processes, job cgroups, overlay mounts).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$repo/scripts/bootstrap.sh" --test
venv=${SANDBOXD_VENV:-$repo/.venv}
pytest_args=("$@")
[[ ${#pytest_args[@]} -gt 0 ]] || pytest_args=(tests)
test_user=${SANDBOXD_TEST_USER:-sandboxd-test}
logs=$(mktemp -d)
stage=
summary=()

# The cgroup v1 directories `sandboxd` below this process's own cgroups: where the root lane's
# jobs go, and below them (in `user-NAME`, delegated by `sandboxd setup`) the rootless lane's,
# whose processes sit in the same cgroups since runuser keeps them there.
sandboxd_cgroup_dirs() {
  local _ controllers path controller
  while IFS=: read -r _ controllers path; do
    for controller in ${controllers//,/ }; do
      if [[ -d /sys/fs/cgroup/$controller${path%/}/sandboxd ]]; then
        echo "/sys/fs/cgroup/$controller${path%/}/sandboxd"
      fi
    done
  done </proc/self/cgroup
}

# job_cgroups DIR: the job cgroups below DIR (tests nest theirs one level deeper).
job_cgroups() {
  find "$1" -mindepth 1 -depth -type d -name 'job-*' 2>/dev/null || true
}

# Undo what an earlier run left in those directories, so the root lane starts as on a fresh
# machine: `sandboxd` itself delegated to the test user (by `sandboxd setup` before it moved to
# `sandboxd/user-NAME`; root's containers, host root without capabilities outside their user
# namespace, cannot create job cgroups in a directory root does not own), and empty job
# cgroups of an interrupted run (the tests fail on any job-* they find). A job cgroup that
# still has processes refuses rmdir and stays.
restore_cgroups() {
  local uid dir job
  uid=$(id -u "$test_user" 2>/dev/null) || uid=
  while read -r dir; do
    if [[ -n $uid && $(stat -c %u "$dir") == "$uid" ]]; then
      chown 0:0 "$dir" "$dir/tasks" "$dir/cgroup.procs"
    fi
    while read -r job; do
      if rmdir "$job" 2>/dev/null; then
        echo "removed the stale job cgroup $job"
      fi
    done < <(job_cgroups "$dir")
  done < <(sandboxd_cgroup_dirs)
}

cleanup() {
  if [[ $(id -u) -eq 0 ]]; then
    restore_cgroups || true
  fi
  if [[ -n $stage ]]; then
    rm -rf "$stage"
  fi
  rm -rf "$logs"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# run_pytest LANE COMMAND...: run a lane's pytest, its closing line kept for the summary.
run_pytest() {
  local lane=$1 status=0
  shift
  echo "== lane: $lane =="
  "$@" 2>&1 | tee "$logs/$lane.log" || status=$?
  summary+=("$lane: $(tail -n 1 "$logs/$lane.log") (exit $status)")
  return "$status"
}

cd "$repo"
if [[ $(id -u) -ne 0 ]]; then
  lane_status=0
  run_pytest "$(id -un)" "$venv/bin/python" -m pytest -p no:cacheprovider "${pytest_args[@]}" || lane_status=$?
  printf '%s\n' "== summary ==" "${summary[@]}"
  exit "$lane_status"
fi

restore_cgroups
root_status=0
run_pytest root "$venv/bin/python" -m pytest -p no:cacheprovider "${pytest_args[@]}" || root_status=$?

# The rootless lane: the same tests as an unprivileged user, from a copy of the tree that
# user can read (the checkout may sit in a private home directory), with its own venv and
# its temporary files (pytest's tmp dirs, hence the state dirs) inside the copy.
id -u "$test_user" >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin "$test_user"
"$venv/bin/sandboxd" setup --user "$test_user"
stage=$(mktemp -d /var/tmp/sandboxd-rootless.XXXXXX)
chmod 755 "$stage"
# Tracked and untracked-but-not-ignored files; a tracked file deleted in the work tree is skipped.
git -c safe.directory="$repo" -C "$repo" ls-files -co --exclude-standard -z |
  tar --null --ignore-failed-read -C "$repo" -T - -cf - | tar -xf - -C "$stage"
/usr/bin/python3 -m venv "$stage/.venv"
"$stage/.venv/bin/python" -m pip install -q --disable-pip-version-check "$stage[test]"
chmod -R a+rX "$stage"
install -d -m 700 -o "$test_user" -g "$(id -g "$test_user")" "$stage/tmp"
rootless_status=0
cd "$stage"
run_pytest rootless runuser -u "$test_user" -- env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/ \
  TMPDIR="$stage/tmp" CI="${CI:-}" "$stage/.venv/bin/python" -m pytest -p no:cacheprovider "${pytest_args[@]}" ||
  rootless_status=$?
cd /

# Nothing may be left behind: the test user's processes (given a moment to exit), job cgroups,
# overlay mounts on the host. Under CI (a machine of its own) any of them fails the run;
# elsewhere another user's tests may share these cgroups at the same time, so they are only
# reported.
leftovers=()
for _ in {1..50}; do
  pgrep -u "$test_user" >/dev/null || break
  sleep 0.1
done
while read -r pid; do
  leftovers+=("process of $test_user: $pid $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)")
done < <(pgrep -u "$test_user" || true)
while read -r dir; do
  while read -r job; do
    leftovers+=("job cgroup: $job")
  done < <(job_cgroups "$dir")
done < <(sandboxd_cgroup_dirs)
while read -r _ mount_point type _; do
  [[ $type != overlay ]] || leftovers+=("overlay mount: $mount_point")
done </proc/mounts
leftover_status=0
if [[ ${#leftovers[@]} -gt 0 ]]; then
  summary+=("left behind:" "${leftovers[@]/#/  }")
  [[ -z ${CI:-} ]] || leftover_status=1
fi

printf '%s\n' "== summary ==" "${summary[@]}"
echo "== lanes: root exit $root_status, rootless exit $rootless_status, left behind ${#leftovers[@]} =="
[[ $root_status -eq 0 && $rootless_status -eq 0 && $leftover_status -eq 0 ]]
