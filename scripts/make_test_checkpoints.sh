#!/usr/bin/env bash
# Generates the seeded random-weight test checkpoints into tests/fixtures/checkpoints/<variant>/
# (gitignored) and verifies each against the sha256 recorded in tests/fixtures/parity/<variant>/
# meta.json. A variant whose files already match is skipped. Needs python3 with numpy only.
#
# Usage: scripts/make_test_checkpoints.sh [OUT_ROOT]   (default: tests/fixtures/checkpoints)
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out_root="${1:-${repo_root}/tests/fixtures/checkpoints}"
generator="${repo_root}/reference/make_checkpoints.py"
variants=(real-towers tiny-hf tiny-native tiny-f32)

for variant in "${variants[@]}"; do
  out="${out_root}/${variant}"
  if [[ -d "${out}" ]] && python3 "${generator}" --variant "${variant}" --out "${out}" --verify \
      >/dev/null 2>&1; then
    echo "${variant}: up to date (${out})"
    continue
  fi
  rm -rf "${out}"
  python3 "${generator}" --variant "${variant}" --out "${out}" >/dev/null
  # Fails loudly (non-zero exit, mismatching file named) if the generator no longer reproduces
  # the checkpoint the committed fixtures were computed from.
  python3 "${generator}" --variant "${variant}" --out "${out}" --verify
done
