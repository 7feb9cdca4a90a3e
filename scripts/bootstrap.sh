#!/usr/bin/env bash
# Set up sandboxd on a fresh Debian or Ubuntu machine: the system packages it needs, then a
# virtualenv with sandboxd installed. Idempotent; safe to run again.
#   scripts/bootstrap.sh          what `sandboxd run` and `sandboxd serve` need
#   scripts/bootstrap.sh --test   also what the test suite needs (compilers, a JDK, node, bwrap)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${SANDBOXD_VENV:-$repo/.venv}

# libseccomp2: the seccomp filter compiler; uidmap: newuidmap/newgidmap for rootless id ranges;
# python3-venv: the virtualenv; util-linux: runuser for the rootless test lane.
packages=(python3 python3-venv libseccomp2 uidmap util-linux)
extras=()
if [[ ${1:-} == --test ]]; then
  # Toolchains the tests run inside containers, bubblewrap as the benchmark's peer,
  # the static busybox the `minimal` image is built from, skopeo (OCI interoperability) and
  # the registry (distribution) that push and pull are tested against.
  packages+=(gcc g++ libc6-dev default-jdk-headless nodejs bubblewrap git busybox-static skopeo docker-registry)
  extras=("[test]")
fi

missing=()
for package in "${packages[@]}"; do
  # nodejs may come from elsewhere than Debian; a working `node` is what counts.
  if [[ $package == nodejs ]] && command -v node >/dev/null; then
    continue
  fi
  status=$(dpkg-query -W -f='${Status}' "$package" 2>/dev/null) || status=
  [[ $status == *"ok installed"* ]] || missing+=("$package")
done
if [[ ${#missing[@]} -gt 0 ]]; then
  sudo=(); [[ $(id -u) -eq 0 ]] || sudo=(sudo)
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if [[ ! -x $venv/bin/python ]]; then
  /usr/bin/python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check -e "$repo${extras[*]:-}"
