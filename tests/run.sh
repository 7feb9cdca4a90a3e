#!/usr/bin/env bash
# Set up and run the whole test suite, the way CI does.
#   tests/run.sh [pytest args]
# As root it runs two lanes: once as root, then once rootless for real as an unprivileged
# user (created here, delegated cgroups with `sandboxd setup --user`). As any other user it
# runs the rootless lane as that user (after root ran `sandboxd setup --user $USER` once).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$repo/scripts/bootstrap.sh" --test
venv=${SANDBOXD_VENV:-$repo/.venv}
pytest_args=("$@")
[[ ${#pytest_args[@]} -gt 0 ]] || pytest_args=(tests)

cd "$repo"
lane_status=0
echo "== lane: $(id -un) (uid $(id -u)) =="
"$venv/bin/python" -m pytest -p no:cacheprovider "${pytest_args[@]}" || lane_status=$?
[[ $(id -u) -eq 0 ]] || exit "$lane_status"

# The rootless lane: the same tests as an unprivileged user, from a copy of the tree that
# user can read (the checkout may sit in a private home directory).
test_user=${SANDBOXD_TEST_USER:-sandboxd-test}
id -u "$test_user" >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin "$test_user"
"$venv/bin/sandboxd" setup --user "$test_user"
stage=$(mktemp -d /var/tmp/sandboxd-rootless.XXXXXX)
trap 'rm -rf "$stage"' EXIT
chmod 755 "$stage"
(cd "$repo" && git ls-files -co --exclude-standard -z | tar --null -T - -cf -) | tar -xf - -C "$stage"
/usr/bin/python3 -m venv "$stage/.venv"
"$stage/.venv/bin/python" -m pip install -q --disable-pip-version-check "$stage[test]"
chmod -R a+rX "$stage"
rootless_status=0
echo "== lane: $test_user (rootless) =="
(cd "$stage" && runuser -u "$test_user" -- env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/ CI="${CI:-}" \
  "$stage/.venv/bin/python" -m pytest -p no:cacheprovider "${pytest_args[@]}") || rootless_status=$?
echo "== lanes: root exit $lane_status, rootless exit $rootless_status =="
[[ $lane_status -eq 0 && $rootless_status -eq 0 ]]
