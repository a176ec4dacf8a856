#!/usr/bin/env bash
# Rebuild web/vendor/three_bundle.js (three.js for the in-node mesh viewer, web/mesh_viewer.js) from the pinned
# npm packages in web-src/ (package.json + package-lock.json): one minified, tree-shaken ES module that exports only
# what web-src/three_entry.js lists. Needs Node.js ≥ 18 and npm (registry access for `npm ci`); the result is
# committed, so ComfyUI users need neither. web-src/node_modules is not committed (.gitignore).
#   scripts/build_web.sh
set -euo pipefail
cd "$(dirname "$0")/../web-src"
npm ci --no-audit --no-fund
version=$(node -p 'require("./node_modules/three/package.json").version')
out=../web/vendor/three_bundle.js
mkdir -p ../web/vendor
banner="// three.js ${version} (npm package three@${version}, MIT licence: THREE_LICENSE beside this file), bundled for the JointDiffusion mesh viewer.
// Generated file: do not edit. Rebuild with scripts/build_web.sh (npm ci in web-src/, then
// npx esbuild three_entry.js --bundle --format=esm --minify --legal-comments=none --outfile=../web/vendor/three_bundle.js)."
npx esbuild three_entry.js --bundle --format=esm --minify --legal-comments=none --log-level=warning \
  "--banner:js=$banner" --outfile="$out"
cp node_modules/three/LICENSE ../web/vendor/THREE_LICENSE
echo "$out: $(wc -c < "$out") bytes (three $version)"
