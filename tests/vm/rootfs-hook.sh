#!/bin/bash
# mmdebstrap --customize-hook for the cgroup-v2 test VM (see build-image.sh): runs on the host
# with the new root filesystem as $1 (mmdebstrap has mounted /proc, /sys and /dev in it).
set -euo pipefail
root=$1
: "${SBXVM_KERNEL_TREE:?}" "${SBXVM_KVER:?}" "${SBXVM_REQUIREMENTS:?}" "${SBXVM_MANIFEST:?}"

# Kernel modules (overlay, veth, virtio-rng, ...) so that the guest can modprobe them.
mkdir -p "$root/usr/lib/modules"
cp -a "$SBXVM_KERNEL_TREE" "$root/usr/lib/modules/"
chroot "$root" depmod "$SBXVM_KVER"

# The unprivileged test user, with subordinate ids for newuidmap/newgidmap.
chroot "$root" useradd --create-home --uid 1500 --user-group --shell /bin/bash sbxtest
for f in subuid subgid; do
    grep -q '^sbxtest:' "$root/etc/$f" 2>/dev/null || echo 'sbxtest:100000:65536' >>"$root/etc/$f"
done

# The project's Python dependencies, installed now: the VM has no network.
# pip trusts the host's CA bundle (a proxy that inspects TLS is trusted there, not in a fresh
# Debian), and uses the host's proxy and index settings, if any.
cp "$SBXVM_REQUIREMENTS" "$root/tmp/requirements.txt"
cp "${PIP_CERT:-${REQUESTS_CA_BUNDLE:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}}" "$root/tmp/host-ca.pem"
pipenv=(PATH=/usr/bin:/bin HOME=/root PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_CERT=/tmp/host-ca.pem)
for v in http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY PIP_INDEX_URL PIP_DEFAULT_TIMEOUT; do
    [[ -z ${!v:-} ]] || pipenv+=("$v=${!v}")
done
chroot "$root" python3 -m venv /opt/venv
chroot "$root" env -i "${pipenv[@]}" /opt/venv/bin/pip install --quiet --no-cache-dir -r /tmp/requirements.txt
rm -f "$root/tmp/requirements.txt" "$root/tmp/host-ca.pem"

# Mount point of the per-run disk (project tree, pytest arguments), a hostname, localhost.
mkdir -p "$root/lane"
echo sbxvm >"$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tsbxvm\n::1\tlocalhost ip6-localhost ip6-loopback\n' \
    >"$root/etc/hosts"

{
    echo "# dpkg"
    chroot "$root" dpkg-query -W -f '${Package} ${Version}\n'
    echo "# /opt/venv"
    chroot "$root" /opt/venv/bin/pip freeze --all
} >"$SBXVM_MANIFEST"

# Nothing of the build's network set-up stays in the image.
rm -f "$root/etc/resolv.conf"
rm -rf "$root/var/cache/apt/archives/"*.deb "$root/var/lib/apt/lists/"* "$root/root/.cache"
