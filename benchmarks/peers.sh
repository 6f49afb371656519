#!/usr/bin/env bash
# Runs benchmarks/peers.py (the PyTorch peers) in a venv of its own: benchmarks/.peers-venv.
#
#   bash benchmarks/peers.sh --config medium            # table on stdout
#   bash benchmarks/peers.sh --config small --json      # one JSON line per measurement
#   bash benchmarks/peers.sh --install-only             # create/refresh the venv, run nothing
#
# The first run creates the venv with `${PEERS_PYTHON:-python3}` and installs the pinned
# packages below (CPU torch: torch must be pinned exactly, an unpinned torch pulls a
# multi-GB CUDA build); later runs reuse it while the pin list is unchanged. The venv
# is gitignored and never touches the project's environment. Install output goes to
# stderr, so stdout carries only peers.py's output.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${PEERS_VENV:-$here/.peers-venv}"
python="${PEERS_PYTHON:-python3}"

# The peers and everything they import, pinned to what pip resolved on the project's machine
# (Python 3.11, 2026-11-26). muse-maskgit-pytorch is installed with --no-deps: its declared
# torchvision (a CUDA build on the registry) cannot load its operators beside CPU torch and then
# breaks `import transformers`; peers.py stubs the few torchvision names that
# muse-maskgit-pytorch imports but never calls for token-level training and decoding.
pins=(
  torch==2.13.0
  diffusers==0.42.1
  # muse-maskgit-pytorch's requirements, less torchvision.
  transformers==5.23.0 accelerate==1.15.0 beartype==0.23.1 einops==0.8.2 ema-pytorch==0.8.3
  memory-efficient-attention-pytorch==0.1.6 vector-quantize-pytorch==1.32.0 pillow==13.0.0
  sentencepiece==0.2.3 tqdm==4.70.1
  # Their dependencies.
  einx==0.4.3 loguru==0.7.3 torch-einops-utils==0.2.0 frozendict==2.5.1 numpy==2.4.6
  huggingface_hub==2.4.0 safetensors==0.8.0 tokenizers==0.23.3 regex==2026.11.19 PyYAML==6.0.4
  filelock==4.3.1 fsspec==2026.9.0 importlib_metadata==10.2.0 zipp==4.1.2 packaging==26.4
  psutil==7.2.2 requests==2.34.2 certifi==2026.10.19.post1 charset-normalizer==3.5.3 idna==3.20
  urllib3==2.8.0 Jinja2==3.1.6 MarkupSafe==3.0.4 networkx==3.6.1 sympy==1.14.0 mpmath==1.3.0
  typing_extensions==4.16.0 hf-xet==1.8.0 httpx2==2.16.2 httpcore2==2.16.2 h11==0.16.0
  anyio==4.16.0 truststore==0.10.5 typer==0.29.2 click==8.5.1 rich==15.0.0 shellingham==1.5.4
  markdown-it-py==4.3.0 mdurl==0.1.2 Pygments==2.21.0 annotated-doc==0.0.7 lazy-importer==0.1.0
  pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
)
nodeps=(muse-maskgit-pytorch==0.3.5)
stamp="$venv/.pins"
want="$(printf '%s\n' "${pins[@]}" "${nodeps[@]}")"

if [[ ! -f "$stamp" ]] || [[ "$(cat "$stamp")" != "$want" ]]; then
  echo "peers.sh: installing the peers into $venv (once, ~1 min)" >&2
  "$python" -m venv --clear "$venv" >&2
  pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
  "${pip[@]}" "${pins[@]}" >&2
  "${pip[@]}" --no-deps "${nodeps[@]}" >&2
  printf '%s\n' "$want" >"$stamp"
fi

if [[ "${1:-}" == "--install-only" ]]; then
  "$venv/bin/python" -m pip freeze >&2
  exit 0
fi
exec "$venv/bin/python" "$here/peers.py" "$@"
