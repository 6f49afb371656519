#!/usr/bin/env bash
# The README's scale-out plans: muse_3b (batch 512) on 512 TPU v4 chips and on 64 H100s, compiled
# in full (48 blocks) for virtual CPU meshes by `muse-jax plan` (one process per plan: the device
# count is fixed when JAX starts). Writes OUT_DIR/<name>.txt and .json. Each plan takes 4-8 min of
# one core and ~4-8 GB of RAM.
#   launch/plans.sh OUT_DIR [PARALLEL]
set -uo pipefail
out="${1:?usage: launch/plans.sh OUT_DIR [PARALLEL]}"; par="${2:-4}"
mkdir -p "$out"
py="${PYTHON:-python3}"
plans=(
  "v4_fsdp512_remat   --mesh data=1,fsdp=512,tensor=1 --remat on  --accelerator tpu_v4"
  "v4_fsdp512_noremat --mesh data=1,fsdp=512,tensor=1 --remat off --accelerator tpu_v4"
  "v4_dp64_fsdp8      --mesh data=64,fsdp=8,tensor=1  --remat on  --accelerator tpu_v4"
  "v4_dp512_remat     --mesh data=512,fsdp=1,tensor=1 --remat on  --accelerator tpu_v4"
  "h100_fsdp64_noremat --mesh data=1,fsdp=64,tensor=1 --remat off --accelerator h100,h100_node"
  "h100_fsdp64_remat  --mesh data=1,fsdp=64,tensor=1  --remat on  --accelerator h100,h100_node"
  "h100_dp8_fsdp8     --mesh data=8,fsdp=8,tensor=1   --remat off --accelerator h100,h100_node"
  "h100_dp64_noremat  --mesh data=64,fsdp=1,tensor=1  --remat off --accelerator h100,h100_node"
  "v4_fsdp128_tp4_noremat --mesh data=1,fsdp=128,tensor=4 --remat off --accelerator tpu_v4"
  "h100_dp8_fsdp4_tp2 --mesh data=8,fsdp=4,tensor=2   --remat off --accelerator h100"
)
# Append --layers-from 2,4 to the plan command below for the fast extrapolated plans (README table).
run() {
  local name="$1"; shift
  local t0=$SECONDS
  "$py" -m muse_jax.cli plan --config muse_3b --batch-size 512 "$@" --json "$out/$name.json" \
    > "$out/$name.txt" 2> >(grep -v "Involuntary full rematerialization" > "$out/$name.err")
  echo "$name rc=$? $((SECONDS - t0))s"
}
export -f run; export out py
printf '%s\n' "${plans[@]}" | xargs -P "$par" -I{} bash -c 'run {}'
