#!/usr/bin/env bash
# Set up blockvirt on a fresh Debian machine: system packages and a virtualenv in .venv.
#   scripts/setup.sh          what `blockvirt serve` needs
#   scripts/setup.sh --test   plus the real NBD clients and test tools the suite drives
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[[ "${1:-}" == "--test" ]] && want_test=1

packages=(python3 python3-venv python3-pip)
if (( want_test )); then
    # Real clients and peers: qemu-img/qemu-io/qemu-nbd, nbdinfo/nbdcopy/nbdsh/nbdfuse,
    # libnbd's Python binding, nbdkit and nbd-server (benchmark peers), fio, ext4 tools, FUSE.
    packages+=(qemu-utils libnbd-bin python3-libnbd nbdkit nbdfuse nbd-server fio e2fsprogs fuse3 util-linux openssl)
    # A real Prometheus (and promtool) for the metrics tests; the tests start their own.
    packages+=(prometheus)
fi

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if (( ${#missing[@]} )); then
    sudo=""
    [[ $(id -u) -ne 0 ]] && sudo="sudo"
    echo "installing: ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
    # Under systemd, Debian starts prometheus as a system service: the tests run their own.
    if [[ " ${missing[*]} " == *" prometheus "* ]] && command -v systemctl >/dev/null; then
        $sudo systemctl disable --now prometheus prometheus-node-exporter >/dev/null 2>&1 || true
    fi
fi

# Debian's interpreter, with system site-packages, so libnbd's `nbd` module is importable.
if [[ ! -x .venv/bin/python ]]; then
    /usr/bin/python3 -m venv --system-site-packages .venv
fi
extra=""
(( want_test )) && extra="[test]"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extra}"
if (( want_test )); then
    # Coverage-guided fuzzing (tools/fuzz/fuzz_nbd.py). A wheel exists for CPython 3.11 on
    # x86_64; elsewhere it may need clang to build: the atheris test then skips.
    .venv/bin/python -m pip install -q --disable-pip-version-check "atheris>=2.3" \
        || echo "warning: atheris could not be installed; its fuzz test will be skipped" >&2
fi
