#!/usr/bin/env bash
# Installs everything moxin-vlm needs to build and test on a fresh Debian 12 machine.
# Idempotent: packages already present are not reinstalled.
#   scripts/setup.sh              build + test dependencies
#   scripts/setup.sh --reference  also the Python reference stack (torch, timm, transformers,
#                                 Pillow, ...) used to regenerate fixtures
set -euo pipefail

DEBIAN_PACKAGES=(
  g++ cmake ninja-build pkg-config git
  libopenblas-openmp-dev          # BLAS (OpenMP build: nested calls stay on the calling thread)
  libjpeg62-turbo-dev libpng-dev libwebp-dev zlib1g-dev   # image codecs, linked statically
  nlohmann-json3-dev libcli11-dev libsentencepiece-dev
  libgtest-dev
  clang libclang-rt-14-dev        # libFuzzer targets
)
PYTHON_PACKAGES=(numpy)           # scripts that generate the test checkpoints
REFERENCE_PACKAGES=(numpy pillow scikit-image safetensors torch timm transformers tokenizers sentencepiece)

missing=()
for pkg in "${DEBIAN_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
wanted=("${PYTHON_PACKAGES[@]}")
[ "${1:-}" = "--reference" ] && wanted=("${REFERENCE_PACKAGES[@]}")
need=()
for pkg in "${wanted[@]}"; do
  module=$pkg
  case $pkg in pillow) module=PIL ;; scikit-image) module=skimage ;; esac
  "$PYTHON" -c "import $module" 2>/dev/null || need+=("$pkg")
done
if ((${#need[@]})); then
  echo "setup: installing Python packages: ${need[*]}"
  "$PYTHON" -m pip install -q "${need[@]}"
fi
echo "setup: ready"
