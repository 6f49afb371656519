"""muse_jax: a JAX/Flax reimplementation of Muse (Chang et al. 2023, arXiv 2301.00704).

Pins: every version below was installed and run together on the project's machine kind
(Python 3.11, 2-core CPU, no GPU) on 2026-11-26. jax/jaxlib 0.10.2 and flax 0.12.8 are the
newest releases the package registry serves here; the rest are the versions pip resolved
alongside them and that the test suite exercises.
"""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    # Core numerics. jaxlib must equal jax; flax 0.12.8 is the release built against jax 0.10.
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    # LoRA for the linen models (muse_jax/models/lora.py) from Google's maintained JAX library: it creates the
    # adapters by intercepting dot_general in the matched modules and keeps the kernels' logical axis names.
    # Pinned because that interception relies on flax/jax internals; 0.1.8 runs with flax 0.12.8 and jax 0.10.2.
    "qwix==0.1.8",
    # Checkpointing: 0.12.8 saves/restores sharded arrays plus grain iterator state
    # (CheckpointManager with Composite args), seen working with jax 0.10.2.
    "orbax-checkpoint==0.12.8",
    "ml-collections==1.1.0",
    "absl-py==2.5.1",
    # Text: sentencepiece trains the shapes vocabulary in-process and reads T5's .model.
    "sentencepiece==0.2.3",
    # CLIP's BPE pre-tokenizer (muse_jax/data/clip_bpe.py) needs Unicode classes (\p{L}, \p{N}) that
    # the standard library's re lacks. 2026.12.2 is the version already installed here beside the
    # test extra's transformers (needs regex>=2025.10.22) and diffusers (regex!=2019.12.17).
    "regex==2026.12.2",
    # Public checkpoints (aMUSEd's UVit2D, CLIP, VQGAN; T5) are read from safetensors files without torch.
    "safetensors==0.8.0",
    # clu: only clu.metrics and clu.parameter_overview are used; clu.metric_writers and
    # clu.periodic_actions import TensorFlow, which is not a dependency.
    "clu==0.0.12",
    # Data: tfds builds and reads array_record without TensorFlow when images are PIL;
    # grain reads them with shuffling, sharding and checkpointable iterators.
    "tensorflow-datasets==4.9.10",
    "grain==0.2.18",
    # tfds 4.9.10 imports it lazily to locate builder code; not pulled in by tfds itself.
    "importlib-resources==7.1.0",
    "array-record==0.8.6",
    "numpy==2.4.6",
    "pillow==13.0.0",
    # Parquet image-text sources (muse_jax/data/files.py) import it directly; until now it came only
    # through tensorflow-datasets. 26.0.1 is the version that resolves with tfds 4.9.10 here.
    "pyarrow==26.0.1",
    # TensorBoard event files without TensorFlow (works with protobuf 7).
    "tensorboardX==2.6.5",
    "protobuf==7.36.2",
    "tqdm==4.70.1",
    # Workdir paths that may be bucket URIs (muse_jax/paths.py); the version orbax resolves.
    "etils[epath]==1.15.0",
    "matplotlib==3.11.2",
]

EXTRAS_REQUIRE = {
    "test": [
        "pytest==9.2.0",
        # Runs independent test files in two worker processes (`make test`: the machines have 2 cores).
        "pytest-xdist==3.8.0",
        # The linter `make test` runs first (configured in pyproject.toml).
        "ruff==0.17.5",
        # Parity tests against PyTorch reference implementations only. torch must be pinned:
        # 2.13.0 is the CPU build on this machine's disk; an unpinned torch pulls a
        # multi-GB CUDA build.
        "torch==2.13.0",
        "transformers==5.23.0",  # T5EncoderModel for the T5 parity test.
        "diffusers==0.42.1",  # VQModel for the VQGAN parity test.
        "webdataset==1.0.2",  # writes test shards, so a different writer checks muse_jax/data/webdataset.py's reader
    ],
    # gs:// workdirs (launch/tpu_pod.sh): etils.epath reads/writes gs:// through fsspec's gcsfs,
    # which also brings google-cloud-storage (used by orbax and tensorboardX for gs://).
    # 2026.10.1 needs fsspec>=2026.9.0, the fsspec this stack installs.
    "gcs": ["gcsfs==2026.10.1"],
    # `muse-jax import-amused amused/amused-256` fetches a hub id where there is network (a local folder
    # needs nothing); 2.4.0 is the version transformers 5.23 and diffusers 0.42.1 resolve with.
    "hub": ["huggingface_hub==2.4.0"],
}

setup(
    name="muse_jax",
    version="0.1.0",
    description="Muse (masked generative transformers for text-to-image) in JAX/Flax",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["muse_jax", "muse_jax.*"]),  # muse_jax.configs ships the named configs
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["muse-jax=muse_jax.cli:main"]},
)
