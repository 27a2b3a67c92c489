#!/usr/bin/env bash
# Does XLA's command-buffer update make the 8-bit decode step host-bound (issue #18)?
#
# A decode step runs as one CUDA graph of ~900-1300 kernels. When an address the graph uses
# changes between executions (temporaries, outputs), XLA updates the graph's nodes on the host
# before the launch. This script times bench/profile_decode.py's variants once with XLA's default
# update mode and once under each other mode this XLA accepts (xla_gpu_command_buffer_update_mode:
# names differ between releases), each in its own process, and writes one profile JSON per mode
# under $OUT/<mode>/.
#
#   PYTHONUNBUFFERED=1 bench/cb_modes.sh [points] [variants]     # on the GPU machine
set -u
points=${1:-131072x4,262144x1}
variants=${2:-sparse_kv_head+w8a8int8+kv8}
out=${OUT:-bench/results}
accepted=()
for mode in NEVER_UPDATE SKIP_TEMP VMM_PERSISTENT_TEMP CAPTURE_CMD_NEVER_UPDATE; do
  if XLA_FLAGS="--xla_gpu_command_buffer_update_mode=$mode" timeout 120 python -c "import jax; jax.devices()" >/dev/null 2>&1; then
    accepted+=("$mode")
  fi
done
echo "update modes this XLA accepts besides its default: ${accepted[*]:-none}"
for mode in default "${accepted[@]}"; do
  flags=""
  [ "$mode" != default ] && flags="--xla_gpu_command_buffer_update_mode=$mode"
  mkdir -p "$out/$mode"
  echo "== $mode (XLA_FLAGS=$flags)"
  XLA_FLAGS="$flags" python bench/profile_decode.py --points "$points" --variants "$variants" --out "$out/$mode" 2>&1 \
    | grep -v "^ " | tail -8
done
