#!/usr/bin/env bash
# Carries JAX's persistent compilation cache between device calls, so that a serving benchmark's
# warm-up (110-195 s an engine on a fresh machine, 2026-12-05) loads its programs instead of
# compiling them again. The cache is kept per card model (an H200's programs do not serve an
# H100) as at most CC_PARTS (default 5) tar.gz parts of < 16 MiB (a call sends back at most 8 files
# of 16 MiB: leave room for the results).
#
#   bench/compile_cache.sh restore [DIR]        # before the runs: unpack DIR/cc-<card>-*.tgz
#   bench/compile_cache.sh save OUT [DIR]       # after them: pack the cache into OUT/cc-<card>-N.tgz
#
# DIR (default .carry/cc) is a git-ignored folder the device call names in `carry`; copy the
# parts a call sent back into it. The cache folder is bench/serve.py's --compile-cache default,
# /tmp/lserve-jax-compile-cache (LSERVE_COMPILE_CACHE overrides it).
set -euo pipefail
CACHE=${LSERVE_COMPILE_CACHE:-/tmp/lserve-jax-compile-cache}
card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr 'A-Z' 'a-z' \
  | grep -o 'h[0-9]\{3\}' | head -1 || true)
card=${card:-unknown}
cmd=${1:-}
case "$cmd" in
  restore)
    dir=${2:-.carry/cc}
    mkdir -p "$CACHE"
    n=0
    for f in "$dir"/cc-"$card"-*.tgz; do
      [ -f "$f" ] || continue
      tar xzf "$f" -C "$CACHE" && n=$((n + 1))
    done
    echo "compile cache: $n part(s) for $card restored into $CACHE ($(ls "$CACHE" | wc -l) entries)"
    ;;
  save)
    out=${2:?usage: compile_cache.sh save OUT [DIR]}
    [ -d "$CACHE" ] || { echo "compile cache: nothing at $CACHE"; exit 0; }
    mkdir -p "$out"
    # entries sorted by size, packed greedily into parts of < 15 MiB (an entry over that is left out)
    python3 - "$CACHE" "$out" "$card" "${CC_PARTS:-5}" <<'EOF'
import os, sys, tarfile
cache, out, card, most = sys.argv[1:4] + [int(sys.argv[4])]
limit = 15 << 20
entries = sorted((os.path.getsize(os.path.join(cache, e)), e) for e in os.listdir(cache)
                 if os.path.isfile(os.path.join(cache, e)))
parts, cur, size, skipped = [], [], 0, 0
for n, e in entries:
    if n > limit:
        skipped += 1
        continue
    if size + n > limit and cur:
        parts.append(cur)
        cur, size = [], 0
    cur.append(e)
    size += n
if cur:
    parts.append(cur)
for i, names in enumerate(parts[:most]):
    with tarfile.open(os.path.join(out, f"cc-{card}-{i}.tgz"), "w:gz") as tar:
        for e in names:
            tar.add(os.path.join(cache, e), arcname=e)
print(f"compile cache: {len(entries) - skipped} entries in {min(len(parts), most)} part(s) under {out}"
      + (f"; {skipped} over the part size and {max(len(parts) - most, 0)} part(s) left out" if skipped or len(parts) > most else ""))
EOF
    ;;
  *)
    sed -n "2,12p" "$0"
    exit 2
    ;;
esac
