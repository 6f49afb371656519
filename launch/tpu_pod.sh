#!/usr/bin/env bash
# Runs one command on every worker of a Cloud TPU VM pod slice (one process per host).
#
#   launch/tpu_pod.sh TPU_NAME ZONE [--project P] [--setup] [--repo DIR] -- COMMAND...
#   launch/tpu_pod.sh muse-v4-512 us-central2-b --setup -- \
#       muse-jax train --config muse_3b --workdir gs://my-bucket/muse_3b \
#       --config.mesh.data=1 --config.mesh.fsdp=-1
#
# --setup copies this checkout to every worker (gcloud scp of a tarball) and pip-installs it with
# jax[tpu] and the gcs extra (gcsfs). The command runs with --config.distributed.cluster=tpu added
# when it is a `muse-jax` command: every worker calls jax.distributed.initialize(), the TPU gives
# the process count and index. The workdir must be on a bucket (gs://...) that all workers see:
# checkpoints are written cooperatively by all processes, logs and images by process 0 only.
# Failure: when a worker dies the others abort (heartbeat timeout); rerun the same command to
# resume from the last checkpoint in the bucket.
set -euo pipefail

if [[ $# -lt 2 ]]; then sed -n '2,15p' "$0"; exit 2; fi
tpu="$1"; zone="$2"; shift 2
project=(); setup=0; repo="muse_jax"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --project) project=(--project "$2"); shift 2 ;;
    --setup) setup=1; shift ;;
    --repo) repo="$2"; shift 2 ;;
    --) shift; break ;;
    *) echo "tpu_pod.sh: unknown option $1 (put the command after --)" >&2; exit 2 ;;
  esac
done
if [[ $# -eq 0 ]]; then echo "tpu_pod.sh: no command given" >&2; exit 2; fi
cmd=("$@")
prev=""
for arg in "${cmd[@]}"; do
  if [[ "$prev" == "--workdir" && "$arg" != gs://* ]]; then
    echo "tpu_pod.sh: warning: --workdir $arg is not a gs:// bucket; each worker would write its own copy" >&2
  fi
  prev="$arg"
done
if [[ "${cmd[0]}" == "muse-jax" ]]; then cmd+=("--config.distributed.cluster=tpu"); fi
ssh() { gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" "${project[@]}" --worker=all "$@"; }

if [[ $setup -eq 1 ]]; then
  here="$(cd "$(dirname "$0")/.." && pwd)"
  tarball="$(mktemp -t muse_jax.XXXXXX).tar.gz"
  tar -C "$here" --exclude=.git --exclude='*.egg-info' --exclude=.venv -czf "$tarball" .
  gcloud compute tpus tpu-vm scp "$tarball" "$tpu:~/muse_jax.tar.gz" --zone "$zone" "${project[@]}" --worker=all
  ssh --command "mkdir -p ~/$repo && tar -C ~/$repo -xzf ~/muse_jax.tar.gz && \
    pip install -q 'jax[tpu]' -e ~/$repo'[gcs]'"
fi
printf -v quoted '%q ' "${cmd[@]}"
ssh --command "cd ~/$repo && PATH=\$HOME/.local/bin:\$PATH $quoted"
