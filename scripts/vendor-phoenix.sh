#!/usr/bin/env bash
# Refreshes the vendored phoenix.js browser client (used by the demo page served by `fawkes serve`)
# from the version locked in tests/js/package-lock.json.
#
#   npm ci --prefix tests/js && scripts/vendor-phoenix.sh
#
# tests/js/test/vendor.test.js checks that the vendored files match the locked package byte for byte.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
pkg="$root/tests/js/node_modules/phoenix"
dest="$root/server/assets"

if [[ ! -f "$pkg/package.json" ]]; then
  echo "error: $pkg is missing; run 'npm ci --prefix tests/js' first" >&2
  exit 1
fi

version="$(node -p "require('$pkg/package.json').version")"
mkdir -p "$dest"
cp "$pkg/priv/static/phoenix.min.js" "$dest/phoenix.min.js"
cp "$pkg/LICENSE.md" "$dest/phoenix.LICENSE.md"
echo "vendored phoenix $version into ${dest#"$root"/}"
