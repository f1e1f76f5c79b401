#!/usr/bin/env bash
# Set up blockvirt on a fresh Debian machine: system packages and a virtualenv in .venv.
#   scripts/setup.sh          what `blockvirt serve` needs
#   scripts/setup.sh --test   plus the real NBD clients and test tools the suite drives
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[[ "${1:-}" == "--test" ]] && want_test=1

packages=(python3 python3-venv python3-pip)
# RBD pools: librados/librbd and their Python bindings (Debian-only; no daemons).
ceph_packages=(python3-rados python3-rbd)
if (( want_test )); then
    # Real clients and peers: qemu-img/qemu-io/qemu-nbd, nbdinfo/nbdcopy/nbdsh/nbdfuse,
    # libnbd's Python binding, nbdkit and nbd-server (benchmark peers), fio, ext4 tools, FUSE.
    packages+=(qemu-utils libnbd-bin python3-libnbd nbdkit nbd-server fio e2fsprogs fuse3 util-linux openssl)
    # A real Prometheus (and promtool) for the metrics tests; the tests start their own.
    packages+=(prometheus)
    # qemu's rbd: block driver, to reach RBD images directly from qemu-img and qemu-io.
    packages+=(qemu-block-extra)
    # A throwaway one-node Ceph for the RBD tests (tests/cephcluster.py runs its own mon,
    # OSD and mgr under a temporary directory; the mgr reports pool usage and trips quotas).
    ceph_packages+=(ceph-mon ceph-osd ceph-mgr ceph-common)
fi

not_installed() {
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"
    done
}
mapfile -t missing < <(not_installed "${packages[@]}")
mapfile -t missing_ceph < <(not_installed "${ceph_packages[@]}")

sudo=""
[[ $(id -u) -ne 0 ]] && sudo="sudo"
apt_install() {
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

if (( ${#missing[@]} + ${#missing_ceph[@]} )); then
    echo "installing: ${missing[*]} ${missing_ceph[*]}"
    $sudo apt-get update -qq
fi
if (( ${#missing[@]} )); then
    apt_install "${missing[@]}"
    # Under systemd, Debian starts prometheus as a system service: the tests run their own.
    if [[ " ${missing[*]} " == *" prometheus "* ]] && command -v systemctl >/dev/null; then
        $sudo systemctl disable --now prometheus prometheus-node-exporter >/dev/null 2>&1 || true
    fi
fi
if (( ${#missing_ceph[@]} )); then
    # Recommends would pull in the mgr's dashboard, radosgw tools, ... (hundreds of MB).
    # No Ceph daemon may start from the package scripts: policy-rc.d says "not now" to
    # invoke-rc.d and deb-systemd-invoke (Docker images ship one already; keep theirs).
    own_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
        $sudo chmod 755 /usr/sbin/policy-rc.d
        own_policy=1
    fi
    status=0
    apt_install --no-install-recommends "${missing_ceph[@]}" || status=$?
    (( own_policy )) && $sudo rm -f /usr/sbin/policy-rc.d
    (( status == 0 )) || exit $status
    # Nor start at boot: ceph-crash and the mon/osd targets are enabled by default.
    if [[ -d /run/systemd/system ]]; then
        $sudo systemctl disable --now ceph-crash.service ceph.target ceph-mon.target ceph-osd.target ceph-mgr.target \
            >/dev/null 2>&1 || true
    fi
fi

# Debian's interpreter, with system site-packages, so libnbd's `nbd` module is importable.
if [[ ! -x .venv/bin/python ]]; then
    /usr/bin/python3 -m venv --system-site-packages .venv
fi
extra=""
(( want_test )) && extra="[test,fast]"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extra}"
if (( want_test )); then
    # Coverage-guided fuzzing (tools/fuzz/fuzz_nbd.py). A wheel exists for CPython 3.11 on
    # x86_64; elsewhere it may need clang to build: the atheris test then skips.
    .venv/bin/python -m pip install -q --disable-pip-version-check "atheris>=2.3" \
        || echo "warning: atheris could not be installed; its fuzz test will be skipped" >&2
fi
