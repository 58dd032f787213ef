#!/usr/bin/env bash
# Put fastDP's source tree (awslabs/fast-differential-privacy; not on any package index) outside the repo,
# for `python benchmarks/step_speed.py --fastdp-src DEST`. Its code is never copied into this repository.
#   benchmarks/_fastdp_setup.sh [DEST] [SOURCE]
# SOURCE is a git URL (default: the GitHub repository) or a local git directory (bare or not).
set -euo pipefail
dest="${1:-$HOME/.cache/dpmemarc/fast-differential-privacy}"
source="${2:-https://github.com/awslabs/fast-differential-privacy.git}"
if [[ -d "$dest/fastDP" ]]; then
  echo "fastDP already at $dest (commit $(cat "$dest/COMMIT" 2>/dev/null || echo unknown))"
  exit 0
fi
mkdir -p "$dest"
if [[ -d "$source" ]]; then
  git --git-dir="$(git -C "$source" rev-parse --absolute-git-dir)" archive HEAD | tar -x -C "$dest"
  git -C "$source" rev-parse HEAD >"$dest/COMMIT"
else
  tmp="$(mktemp -d)"
  git clone --quiet --depth 1 "$source" "$tmp/repo"
  git -C "$tmp/repo" archive HEAD | tar -x -C "$dest"
  git -C "$tmp/repo" rev-parse HEAD >"$dest/COMMIT"
  rm -rf "$tmp"
fi
echo "fastDP $(cat "$dest/COMMIT") at $dest; run: python benchmarks/step_speed.py --fastdp-src $dest"
