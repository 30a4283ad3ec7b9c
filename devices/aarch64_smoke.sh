#!/usr/bin/env bash
# Run a bundle with itera-run under an emulated aarch64 (what a Raspberry Pi 4/5 with a 64-bit
# OS runs), and check its greedy text equals this machine's.
#
#   devices/aarch64_smoke.sh BUNDLE [WORKDIR]      (ORT=1.24.4 devices/aarch64_smoke.sh ... for another release)
#
# Needs: Debian/Ubuntu with `apt-get install -y qemu-user-static` (x86-64 host), network for
# apt and pip. Nothing is installed system-wide beyond qemu: an arm64 Python 3.11 comes from
# Debian's arm64 packages, unpacked into WORKDIR/sysroot with apt's own state kept in WORKDIR
# (the host's apt lists and architectures are untouched), and the base install's aarch64 wheels
# (the same `pip download --platform` set the network test resolves) go into WORKDIR/site.
# WORKDIR is reused between runs (default: /tmp/itera-aarch64).
#
# onnxruntime defaults to the portable floor (pyproject's), i.e. what an old device has: a dual
# bundle runs its portable graphs. Under Debian 12's qemu 7.2, aarch64 onnxruntime 1.30.0 and
# 1.32.0 die with SIGSEGV on import (1.19.x and 1.24.4 import fine), so the fused graphs
# (>= 1.30) cannot be smoke-tested this way; that says nothing about real aarch64 hardware.
set -euo pipefail
BUNDLE=$(realpath "${1:?usage: devices/aarch64_smoke.sh BUNDLE [WORKDIR]}")
W=${2:-/tmp/itera-aarch64}
REPO=$(cd "$(dirname "$0")/.." && pwd)
HOST_PY=${HOST_PY:-python3}
ORT=${ORT:-1.19.0}
PROMPT="To be, or not to be"
N=24
command -v qemu-aarch64-static >/dev/null || { echo "error: qemu-aarch64-static not found (apt-get install -y qemu-user-static)" >&2; exit 1; }
mkdir -p "$W"/apt/lists/partial "$W"/apt/cache/archives/partial "$W"/debs "$W"/sysroot
start=$(date +%s)

# 1. An arm64 Python 3.11 from Debian's packages, unpacked (not installed) into a sysroot.
APT=(-o APT::Architecture=arm64 -o APT::Architectures::=arm64 -o Dir::State::Lists="$W/apt/lists"
     -o Dir::Cache="$W/apt/cache" -o Dir::State::status="$W/apt/status" -o Debug::NoLocking=1)
if [ ! -x "$W/sysroot/usr/bin/python3.11" ]; then
  touch "$W/apt/status"
  apt-get "${APT[@]}" update -qq
  (cd "$W/debs" && apt-get "${APT[@]}" download -qq \
     python3.11-minimal libpython3.11-minimal libpython3.11-stdlib libc6 libgcc-s1 libstdc++6 zlib1g \
     libexpat1 libffi8 libssl3 libbz2-1.0 liblzma5 libcrypt1 libuuid1 libsqlite3-0 libncursesw6 libtinfo6 \
     libreadline8 libdb5.3 libgdbm6 libnsl2 libtirpc3 libgssapi-krb5-2 libkrb5-3 libk5crypto3 libcom-err2 \
     libkrb5support0 libkeyutils1 media-types)
  for deb in "$W"/debs/*.deb; do dpkg-deb -x "$deb" "$W/sysroot"; done
fi
PY=(qemu-aarch64-static -L "$W/sysroot" "$W/sysroot/usr/bin/python3.11")

# 2. The base install for aarch64: wheels only, into a plain folder on PYTHONPATH.
if [ ! -d "$W/site/numpy" ]; then
  "$HOST_PY" -m pip install -q --target "$W/site" --only-binary=:all: --python-version 3.11 \
    --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64 \
    numpy tokenizers psutil click tqdm
fi
PLAT=(--only-binary=:all: --python-version 3.11 --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64
      --platform manylinux2014_aarch64)
[ -d "$W/ort-$ORT/onnxruntime" ] || "$HOST_PY" -m pip install -q --no-deps --target "$W/ort-$ORT" "${PLAT[@]}" "onnxruntime==$ORT"
rm -rf "$W/site/itera_runtime" "$W/site/itera_bench"
cp -r "$REPO/runtime" "$W/site/itera_runtime"  # the runtime is pure Python: the checkout as is
ready=$(date +%s)

# 3. The same greedy generation here and under emulation.
"$HOST_PY" -m itera_runtime.cli "$BUNDLE" -p "$PROMPT" -n $N --temperature 0 --threads 1 --json > "$W/x86.json"
t0=$(date +%s)
PYTHONPATH="$W/ort-$ORT:$W/site" "${PY[@]}" -m itera_runtime.cli "$BUNDLE" -p "$PROMPT" -n $N --temperature 0 --threads 1 \
  --json > "$W/aarch64.json"
t1=$(date +%s)
"$HOST_PY" - "$W/x86.json" "$W/aarch64.json" <<'EOF'
import json, sys
x86, arm = (json.load(open(p)) for p in sys.argv[1:3])
print(f"x86-64 : onnxruntime {x86['onnxruntime']}, graph set {x86['graph_set']}, text {x86['text']!r}")
print(f"aarch64: onnxruntime {arm['onnxruntime']}, graph set {arm['graph_set']}, text {arm['text']!r}")
if x86["text"] != arm["text"]:
    sys.exit("error: greedy text differs between x86-64 and aarch64")
print("greedy text identical")
EOF
echo "setup $((ready - start)) s (first run downloads ~60 MB), emulated itera-run $((t1 - t0)) s"
