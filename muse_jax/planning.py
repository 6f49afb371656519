"""Memory and FLOPs planner: compile the real training step for a virtual mesh, no hardware needed.

    muse-jax plan --config muse_3b --mesh data=1,fsdp=512,tensor=1 --accelerator tpu_v4

How it works: the process pretends to have N CPU devices (`--xla_force_host_platform_device_count`,
set before JAX starts), builds the mesh and the training state's shardings exactly as `muse-jax
train` does, and lowers and compiles `make_train_step` on abstract inputs (`jax.ShapeDtypeStruct`;
no parameter is allocated). The step is the one `train` runs for the config (`step_source`): for
streamed real data (the paper configs) the batch holds uint8 images at the stage's pixels and
caption ids, and the step runs the frozen VQGAN tokenizer(s) and, with `config.text.trainable=False`,
the frozen T5 encoder (training/online.py `Prepare.abstract`: their parameters abstract too, sharded
by their logical axes); with `config.data.source="tokens"` only the frozen T5 runs in the step; the
shapes token cache feeds tokens and cached T5 embeddings. From the compiled SPMD program of one
device it reads
  - XLA's memory analysis: arguments (state, frozen parameters, batch shard), outputs, aliased (donated) bytes and
    temporaries (activations, gradients, workspace), hence the peak per device;
  - XLA's cost analysis: FLOPs and bytes accessed per device per step;
  - the collectives in the optimised HLO (all-gather, reduce-scatter, all-reduce, ...): bytes each
    device sends per step.
With an accelerator's peak FLOP/s and interconnect bandwidth (`ACCELERATORS`), the step time is
bounded below by max(compute at peak, communication) (perfect overlap); the predicted step time
is compute at EFFICIENCY (50 %) of peak plus communication, not overlapped; MFU = the transformer's
model FLOPs (analytic, no remat; as `train`'s perf/mfu) / (step time x devices x peak): the frozen
encoders' forward passes take step time but are not counted as model FLOPs.
Real steps are slower than the lower bound (no kernel reaches peak); the HBM-traffic time from
XLA:CPU's bytes accessed is shown for reference only (CPU fusion is far coarser).

Deep models compile slowly on a CPU (muse_3b: 4-8 minutes per plan on one core). `layers_from=(a, b)`
compiles the same model with a and b blocks and extrapolates every figure linearly to the
configured depth (each block adds the same parameters, FLOPs, collectives and buffers);
tests/test_planning.py checks the extrapolation against a full compile.

Caveats: the program is compiled by XLA:CPU, not by the TPU/GPU compiler: fusion, layouts and
scheduling differ, so temporaries and bytes accessed are estimates. In particular XLA:CPU's
schedule does not realise the memory saving of rematerialisation (its temporaries barely change
with remat, although the recomputation shows in its FLOPs), and it keeps FSDP gradient reductions
as all-reduce where TPU/GPU compilers emit reduce-scatter (half the traffic). So "fits" is decided
on exact state bytes (from the shardings) + one gradient per parameter + the analytic saved
activations (`analytic_activation_bytes`) + the frozen encoders' parameter shards <= 90 % of HBM
(the frozen forward passes save nothing for the backward pass; their transient activations are
not counted); XLA:CPU's peak is shown beside it. The analytic count (`analytic_train_flops`, plus
`analytic_t5_encoder_flops` and `analytic_vqgan_encoder_flops` for the frozen encoders in the
step) cross-checks the FLOPs.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
from collections.abc import Mapping
from typing import Any

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Accelerator:
    """Per-chip peak dense bf16 FLOP/s, HBM capacity and bandwidth, interconnect bandwidth."""

    name: str
    peak_flops: float  # dense bf16 FLOP/s per chip
    hbm_bytes: float
    hbm_bandwidth: float  # bytes/s
    interconnect_bandwidth: float  # bytes/s per chip that one collective can use (see notes)
    source: str
    notes: str = ""
    devices_per_node: int = 0  # > 0: collectives within a node use intra_node_bandwidth
    intra_node_bandwidth: float = 0.0


# Vendor figures. Interconnect: for TPUs the per-chip ICI bandwidth of the vendor table (all links,
# bidirectional); for H100 the NVLink 4 bandwidth inside a node and 400 Gb/s InfiniBand per GPU
# between nodes (the slower one bounds a collective that crosses nodes).
ACCELERATORS: dict[str, Accelerator] = {
    "tpu_v4": Accelerator(
        "TPU v4", 275e12, 32 * GiB, 1200e9, 6 * 50e9,
        "https://cloud.google.com/tpu/docs/v4 (275 TFLOP/s bf16, 32 GiB HBM2, 1200 GB/s); ICI: 6 links "
        "x 50 GB/s per chip, Jouppi et al. 2023, 'TPU v4', ISCA (arXiv 2304.01433)",
    ),
    "tpu_v5e": Accelerator(
        "TPU v5e", 197e12, 16e9, 819e9, 1600e9 / 8,
        "https://cloud.google.com/tpu/docs/v5e (197 TFLOP/s bf16, 16 GB HBM2, 819 GB/s, ICI 1600 Gbps)",
    ),
    "tpu_v5p": Accelerator(
        "TPU v5p", 459e12, 95e9, 2765e9, 4800e9 / 8,
        "https://cloud.google.com/tpu/docs/v5p (459 TFLOP/s bf16, 95 GB HBM2e, 2765 GB/s, ICI 4800 Gbps)",
    ),
    "h100": Accelerator(
        "NVIDIA H100 SXM", 989e12, 80e9, 3.35e12, 400e9 / 8,
        "https://www.nvidia.com/en-us/data-center/h100/ datasheet (H100 SXM: 989 TFLOP/s dense bf16 "
        "[1979 with sparsity], 80 GB HBM3, 3.35 TB/s, NVLink 900 GB/s); inter-node 400 Gb/s "
        "InfiniBand NDR per GPU (DGX H100)",
        notes="between nodes InfiniBand (50 GB/s per GPU); within a node of 8, NVLink (900 GB/s)",
        devices_per_node=8, intra_node_bandwidth=900e9,
    ),
    "h100_node": Accelerator(
        "NVIDIA H100 SXM (one node)", 989e12, 80e9, 3.35e12, 900e9,
        "https://www.nvidia.com/en-us/data-center/h100/ (as h100); collectives inside one 8-GPU node "
        "over NVLink 4 (900 GB/s per GPU)",
    ),
}


def accelerator(name: str) -> Accelerator:
    if name not in ACCELERATORS:
        raise ValueError(f"unknown accelerator {name!r}; known: {sorted(ACCELERATORS)}")
    return ACCELERATORS[name]


# ----------------------------------------------------------------------------- virtual devices


def parse_mesh(spec: str | Mapping[str, int]) -> dict[str, int]:
    """'data=2,fsdp=4,tensor=1' -> {'data': 2, 'fsdp': 4, 'tensor': 1} (missing axes = 1)."""
    if isinstance(spec, Mapping):
        out = {k: int(v) for k, v in spec.items()}
    else:
        out = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, sep, value = part.partition("=")
            if not sep or not value.strip().lstrip("-").isdigit():
                raise ValueError(f"--mesh {spec!r}: expected axis=size pairs like data=2,fsdp=4,tensor=1")
            out[name.strip()] = int(value)
    axes = ("data", "fsdp", "tensor")
    unknown = sorted(set(out) - set(axes))
    if unknown:
        raise ValueError(f"--mesh: unknown axes {unknown}; the mesh axes are {axes}")
    for k, v in out.items():
        if v < 1:
            raise ValueError(f"--mesh: {k}={v}; planning needs explicit positive sizes (no -1)")
    return {a: out.get(a, 1) for a in axes}


def ensure_virtual_devices(n: int) -> None:
    """Makes JAX start with `n` CPU devices; must run before JAX initialises its backend."""
    if "jax" in sys.modules:
        import jax

        try:
            from jax._src import xla_bridge

            started = bool(xla_bridge._backends)  # noqa: SLF001 (no public query for this)
        except Exception:  # pragma: no cover
            started = True
        if started:
            have = len(jax.devices())
            if have < n:
                raise RuntimeError(
                    f"planning needs {n} devices but JAX already started with {have}; run in a fresh "
                    f"process (`muse-jax plan` does) or set XLA_FLAGS=--xla_force_host_platform_device_count={n}"
                )
            return
    old = os.environ.get("XLA_FLAGS", "")
    m = re.search(r"--xla_force_host_platform_device_count=(\d+)", old)
    n = max(n, int(m[1]) if m else 0)  # never fewer devices than already asked for
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", old)
    # The CPU code is never run: skip LLVM's optimisations (about 2x faster compiles; the HLO,
    # its memory and cost analyses are unchanged).
    for fast in ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"):
        if fast.split("=")[0] not in flags:
            flags += " " + fast
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:
        sys.modules["jax"].config.update("jax_platforms", "cpu")


# ----------------------------------------------------------------------------- analytic count


def analytic_forward_flops(model_config, batch: int, text_length: int) -> float:
    """Matmul FLOPs (2 per multiply-add) of one forward pass of the masked transformer.

    Per block with width E, MLP width M, N image tokens and a memory of S entries (text, plus
    the low-res tokens for super-res): self-attention projections 8·N·E², scores and weighted
    sum 4·N²·E; cross-attention q/out 4·N·E², k/v 4·S·E², scores 4·N·S·E; MLP 4·N·E·M.
    Plus the text projection 2·T·D·E, the head 2·N·E² + 2·N·E·K, and for super-res the low-res
    encoder (self-attention + MLP blocks on n tokens). Embedding lookups are gathers (no FLOPs).
    With patch_size p > 1 the blocks run on P = N/p² positions (N -> P above) and the patch
    projections in and out add 4·N·E².
    """
    c = model_config
    E, M, K, N, T, D = c.width, c.mlp_dim, c.codebook_size, c.grid_size**2, text_length, c.text_dim
    P = _positions(c)
    n_low = c.lowres_grid_size**2 if c.lowres_grid_size else 0
    S = T + n_low

    def self_block(n):
        return 8 * n * E * E + 4 * n * n * E + 4 * n * E * M

    per_block = self_block(P) + 4 * P * E * E + 4 * S * E * E + 4 * P * S * E
    flops = c.num_layers * per_block + 2 * T * D * E + 2 * N * E * E + 2 * N * E * K
    if P != N:
        flops += 4 * N * E * E
    if n_low:
        flops += c.num_lowres_layers * self_block(n_low)
    return float(batch * flops)


def analytic_train_flops(model_config, batch: int, text_length: int, remat: bool | None = None,
                         attention: str | None = None) -> dict[str, float]:
    """Model FLOPs of a training step (3x forward: forward, grads of activations and weights) and
    the FLOPs executed including block rematerialisation (one more forward of the blocks) and, for
    attention that does not keep its probabilities (blockwise, fused), the logits q·k recomputed
    in its backward pass (2·lq·lk·E per attention)."""
    fwd = analytic_forward_flops(model_config, batch, text_length)
    c = model_config
    remat = c.remat if remat is None else remat
    attention = getattr(c, "attention", "xla") if attention is None else attention
    E, D, T = c.width, c.text_dim, text_length
    # the text embeddings are inputs, not parameters: no gradient w.r.t. them is computed
    model = 3 * fwd - batch * 2 * T * D * E
    executed = model
    if remat:
        head_and_proj = batch * (2 * T * D * E + 2 * c.grid_size**2 * E * (E + c.codebook_size))
        executed += fwd - head_and_proj
    executed += batch * sum(2 * lq * lk * E * calls for lq, lk, calls in _attention_calls(c, T)
                            if attention_path(attention, lq, lk) != "xla")
    return {"forward": fwd, "model": float(model), "executed": float(executed)}


def analytic_t5_encoder_flops(t5_config, batch: int, length: int) -> float:
    """Matmul FLOPs (2 per multiply-add) of a T5 encoder's forward pass on `batch` texts of `length` ids.

    Per layer with width d, h heads of width k and feed-forward width f, on L positions: the q, k,
    v projections 6·L·d·h·k, scores and weighted sum 4·L²·h·k, the output projection 2·L·h·k·d,
    the feed-forward 4·L·d·f, or 6·L·d·f gated (wi_0, wi_1, wo). The embedding and the relative
    position bias are gathers (no FLOPs).
    """
    c = t5_config
    L, d, hk, f = length, c.d_model, c.num_heads * c.d_kv, c.d_ff
    gated = str(c.feed_forward_proj).startswith("gated")
    per_layer = 8 * L * d * hk + 4 * L * L * hk + (6 if gated else 4) * L * d * f
    return float(batch * c.num_layers * per_layer)


def analytic_vqgan_encoder_flops(vqgan_config, batch: int, image_size: int) -> float:
    """Conv and matmul FLOPs (2 per multiply-add) of a VQGAN's `encode` on `batch` square images.

    A k x k convolution from C to C' channels costs 2·C·C' per kernel tap that lands on the image:
    with zero padding ("SAME", stride 1) an n-pixel side has 3n - 2 such taps for k = 3 (n for
    k = 1), the stride-2 downsampling on the image padded right and bottom 3·n/2 - 1 (XLA's cost
    analysis counts the same taps). The encoder: conv_in; per resolution `num_res_blocks` residual
    blocks (two 3x3 convs, a 1x1 shortcut where the width changes) and a downsampling conv between
    resolutions ("avgpool": no FLOPs); the middle block (two residual blocks, with `mid_attention`
    a single-head attention over the n = s² positions: 8·n·C² + 4·n²·C); conv_out to the latent
    channels, the 1x1 quant_conv (`quant_conv`) and the nearest-code search 2·n·K·code_dim.
    Norms and activations are elementwise (not counted).
    """
    c = vqgan_config
    channels = [int(x) for x in c.channels]

    def conv(cin, cout, taps):  # taps per side
        return 2 * cin * cout * taps * taps

    def conv3(cin, cout, n):
        return conv(cin, cout, 3 * n - 2)

    def res(cin, cout, n):
        return conv3(cin, cout, n) + conv3(cout, cout, n) + (conv(cin, cout, n) if cin != cout else 0)

    n = int(image_size)
    flops = conv3(getattr(c, "in_channels", 3), channels[0], n)
    width = channels[0]
    for i, ch in enumerate(channels):
        for _ in range(c.num_res_blocks):
            flops += res(width, ch, n)
            width = ch
        if i < len(channels) - 1:
            if c.downsample == "conv":
                flops += conv(ch, ch, 3 * (n // 2) - 1)
            n //= 2
    flops += 2 * res(width, width, n)
    if getattr(c, "mid_attention", False):
        flops += 8 * n * n * width * width + 4 * (n * n) ** 2 * width
    flops += conv3(width, c.latent_channels, n)
    if getattr(c, "quant_conv", False):
        flops += conv(c.latent_channels, c.code_dim, n)
    flops += 2 * n * n * c.codebook_size * c.code_dim
    return float(batch * flops)


def _positions(c) -> int:
    """Positions of the predicting stack: one per patch_size² tokens."""
    return (c.grid_size // getattr(c, "patch_size", 1)) ** 2


def _attention_calls(c, text_length: int) -> list[tuple[int, int, int]]:
    """(queries, keys, number of layers) of each attention of the stage, per example."""
    N = _positions(c)
    n = c.lowres_grid_size**2 if c.lowres_grid_size else 0
    calls = [(N, N, c.num_layers), (N, text_length + n, c.num_layers)]
    return calls + [(n, n, c.num_lowres_layers)] if n else calls


def attention_path(attention: str, lq: int, lk: int) -> str:
    """What `attention` computes for [lq, lk] on a TPU: "xla", "blockwise" or "fused".

    "auto" is blockwise from AUTO_BLOCKWISE_MIN_LOGITS logits per head, else xla (on a GPU it
    would be fused throughout). Only the xla path keeps the [lq, lk] probabilities for the
    backward pass; blockwise and fused recompute them from q, k, v.
    """
    if attention == "auto":
        from muse_jax.models.layers import AUTO_BLOCKWISE_MIN_LOGITS

        return "blockwise" if lq * lk >= AUTO_BLOCKWISE_MIN_LOGITS else "xla"
    return attention


def analytic_activation_bytes(model_config, batch: int, text_length: int, remat: bool | None = None,
                              attention: str | None = None) -> float:
    """Activations kept for the backward pass of `batch` examples (the per-device batch), in bytes.

    Per token and block, in the compute dtype (s bytes): the inputs of the matmuls (3 LayerNorm
    outputs, q, k, v, the self- and cross-attention outputs, cross-attention q: 9E; a low-res
    encoder block without cross-attention: 6E) and both MLP activations (2M); 1-byte dropout
    masks (3E + M, encoder 2E + M) when dropout is on; per example the cross-attention keys and
    values (2·S·E). Attention with the xla path (`attention`, default the config's) also keeps
    its probabilities, h·lq·lk per example in float32 and in s; blockwise and fused attention
    recompute them. With `remat`, a block keeps only its input (E) and one block's set is live
    again during its backward. Plus the float32 logits and their gradient (2·N·K·4 per example).
    With patch_size p > 1 the blocks hold P = N/p² positions instead of N tokens.
    """
    c = model_config
    remat = c.remat if remat is None else remat
    attention = getattr(c, "attention", "xla") if attention is None else attention
    s = 2 if c.dtype in ("bfloat16", "float16") else 4
    E, M, K, N, h = c.width, c.mlp_dim, c.codebook_size, c.grid_size**2, c.num_heads
    P = _positions(c)
    n = c.lowres_grid_size**2 if c.lowres_grid_size else 0
    S = text_length + n
    dropout = c.dropout_rate > 0

    def probs(lq, lk):
        return h * lq * lk * (4 + s) if attention_path(attention, lq, lk) == "xla" else 0

    decoder = P * (s * (9 * E + 2 * M) + dropout * (3 * E + M)) + probs(P, P) + probs(P, S) + 2 * S * E * s
    encoder = n * (s * (6 * E + 2 * M) + dropout * (2 * E + M)) + probs(n, n)
    encoder_layers = c.num_lowres_layers or 0
    if remat:
        blocks = (c.num_layers * P + encoder_layers * n) * E * s + max(decoder, encoder if encoder_layers else 0)
    else:
        blocks = c.num_layers * decoder + encoder_layers * encoder
    return float(batch * (blocks + 2 * N * K * 4))


def compute_flops_per_device(model_config, text_length: int, xla_per_device: float, analytic_executed: float,
                             num_devices: int) -> float:
    """FLOPs per device for the compute time: XLA's count, or the analytic count of all the step
    executes (`analytic_executed`: the transformer with remat, plus the frozen encoders it runs) when
    larger and the stage runs blockwise attention (XLA's cost analysis counts a loop's body once, not
    once per iteration, so it misses most of the blockwise scans' work)."""
    attention = getattr(model_config, "attention", "xla")
    loops = any(attention_path(attention, lq, lk) == "blockwise" for lq, lk, _ in _attention_calls(model_config, text_length))
    return max(xla_per_device, analytic_executed / num_devices) if loops else xla_per_device


def _activations_by_attention(model_config, batch: int, text_length: int) -> dict[str, float]:
    """`analytic_activation_bytes` with the xla and with the blockwise attention."""
    return {a: analytic_activation_bytes(model_config, batch, text_length, attention=a) for a in ("xla", "blockwise")}


# ----------------------------------------------------------------------------- collectives


_COLLECTIVE = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>.*?)\s+"
    r"(?P<op>all-gather|reduce-scatter|all-reduce|all-to-all|collective-permute)(?P<start>-start)?\("
)
_ARRAY = re.compile(r"(?P<dtype>pred|s8|u8|s16|u16|f16|bf16|s32|u32|f32|s64|u64|f64|c64|c128)\[(?P<dims>[0-9,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
          "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}


def _shape_bytes(shape: str) -> int:
    total = 0
    for m in _ARRAY.finditer(shape):
        dims = [int(d) for d in m["dims"].split(",") if d]
        total += math.prod(dims) * _BYTES[m["dtype"]]
    return total


def _block(groups, num_devices: int) -> int:
    """The smallest aligned block of device ids (a divisor of the device count) holding each group."""
    for b in range(1, num_devices + 1):
        if num_devices % b == 0 and all(min(g) // b == max(g) // b for g in groups):
            return b
    return num_devices


def _group_ids(line: str, num_devices: int):
    """The replica groups of a collective as lists of device ids, or None if not printed."""
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([0-9,]*)\](?:T\(([0-9,]*)\))?", line)
    import numpy as np

    if m:
        ids = np.arange(int(m[1]) * int(m[2])).reshape([int(x) for x in m[3].split(",") if x])
        if m[4]:
            ids = ids.transpose([int(x) for x in m[4].split(",") if x])
        return ids.reshape(int(m[1]), int(m[2])).tolist()
    m = re.search(r"replica_groups=\{(\{[0-9,{}]*\})\}", line)
    if m:
        return [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([0-9,]*)\}", m[1])]
    m = re.search(r"replica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=\(\[([0-9,]*)\](?:T\(([0-9,]*)\))?\))?"
                  r"\s*\{([^}]*)\}", line)
    if m:
        axes = [(k, int(v)) for k, v in re.findall(r"'([^']+)'=(\d+)", m[1])]
        shape = [v for _, v in axes]
        ids = np.arange(math.prod(shape))
        if m[2]:
            ids = ids.reshape([int(x) for x in m[2].split(",") if x])
            if m[3]:
                ids = ids.transpose([int(x) for x in m[3].split(",") if x])
        ids = ids.reshape(shape)
        group = [i for i, (k, _) in enumerate(axes) if k in set(re.findall(r"'([^']+)'", m[4]))]
        rest = [i for i in range(len(axes)) if i not in group]
        size = math.prod(shape[i] for i in group)
        return ids.transpose(rest + group).reshape(-1, size).tolist()
    return None


def _group_info_block(line: str, num_devices: int) -> tuple[int, bool, int]:
    """(group size, consecutive aligned ids, smallest aligned id block holding each group)."""
    groups = _group_ids(line, num_devices)
    if not groups or not groups[0]:
        return num_devices, True, num_devices
    size = len(groups[0])
    b = _block(groups, max(num_devices, max(max(g) for g in groups) + 1))
    return size, b == size, b


def _group_info(line: str, num_devices: int) -> tuple[int, bool]:
    """(devices per replica group, whether each group is a block of consecutive device ids)."""
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[[0-9,]*\](?P<t>T\()?", line)  # iota [groups,size]<=[..]
    if m:
        return int(m[2]), m["t"] is None or int(m[1]) == 1
    m = re.search(r"replica_groups=\{\{([0-9,]*)\}", line)  # explicit {{0,1},{2,3}}
    if m:
        ids = [int(x) for x in m[1].split(",") if x]
        return len(ids), (ids == list(range(ids[0], ids[0] + len(ids))) and ids[0] % len(ids) == 0) if ids else True
    m = re.search(r"replica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=\(\[([0-9,]*)\](?:T\(([0-9,]*)\))?\))?"
                  r"\s*\{([^}]*)\}", line)  # mesh['a'=4,'b'=2][, device_ids=([2,4]T(1,0))] {'b'}
    if m:
        import numpy as np

        axes = [(k, int(v)) for k, v in re.findall(r"'([^']+)'=(\d+)", m[1])]
        shape = [v for _, v in axes]
        ids = np.arange(math.prod(shape))
        if m[2]:  # the devices: iota of these dims, optionally transposed, then laid out on the mesh
            ids = ids.reshape([int(x) for x in m[2].split(",") if x])
            if m[3]:
                ids = ids.transpose([int(x) for x in m[3].split(",") if x])
        ids = ids.reshape(shape)
        group = [i for i, (k, _) in enumerate(axes) if k in set(re.findall(r"'([^']+)'", m[4]))]
        rest = [i for i in range(len(axes)) if i not in group]
        size = math.prod(shape[i] for i in group)
        groups = ids.transpose(rest + group).reshape(-1, size)
        aligned = all(sorted(g) == list(range(g.min(), g.min() + size)) and g.min() % size == 0 for g in groups)
        return size, bool(aligned)
    return num_devices, True


def _group_size(line: str, num_devices: int) -> int:
    return _group_info(line, num_devices)[0]


def collective_bytes(hlo_text: str, num_devices: int, *, by_group: bool = False) -> dict[str, float]:
    """Bytes each device sends per step, by collective kind (ring algorithms), from optimised HLO.

    all-gather with result R over g devices: R·(g-1)/g; reduce-scatter with result R: R·(g-1);
    all-reduce of R: 2·R·(g-1)/g; all-to-all: R·(g-1)/g; collective-permute: R.
    `by_group=True` keys the bytes by "<group size>:<contiguous|strided>:<block>" instead, block
    being the smallest aligned range of device ids holding each group (consecutive devices share a
    node on GPU clusters).
    """
    out: dict[str, float] = {}
    for line in hlo_text.splitlines():
        m = _COLLECTIVE.search(line)
        if not m:
            continue
        op, size = m["op"], _shape_bytes(m["shape"])
        g, contiguous, block = _group_info_block(line, num_devices)
        g = max(1, g)
        if g == 1 and op != "collective-permute":
            continue
        factor = {"all-gather": (g - 1) / g, "reduce-scatter": g - 1, "all-reduce": 2 * (g - 1) / g,
                  "all-to-all": (g - 1) / g, "collective-permute": 1.0}[op]
        if m["start"] and op in ("all-gather", "collective-permute"):  # async: (operands, results[, ...])
            arrays = [x.group(0) for x in _ARRAY.finditer(m["shape"])]
            size = sum(_shape_bytes(x) for x in arrays[len(arrays) // 2 : 2 * (len(arrays) // 2)]) or size
        key = f"{g}:{'contiguous' if contiguous else 'strided'}:{block}" if by_group else op
        out[key] = out.get(key, 0.0) + size * factor
    return out


# ----------------------------------------------------------------------------- the plan


def step_source(config) -> str:
    """What the batches of `muse-jax train` hold for `config` (training/loop.py `workdir_stage_data`):
    "images" (real data streamed: uint8 images and caption ids, tokenized in the step by the frozen
    VQGAN(s), with a frozen T5 there too), "tokens" (`config.data.source="tokens"`: tokens computed once,
    caption ids; a frozen T5 runs in the step) or "cache" (shapes: the token cache, and the frozen T5's
    embeddings cached once)."""
    if config.data.get("name") == "shapes":
        return "cache"
    return "tokens" if config.data.source == "tokens" else "images"


def in_step_flops(config, stage: str, batch: int, text_length: int) -> dict[str, float]:
    """Analytic FLOPs of the frozen encoders that `stage`'s train step runs on `batch` examples (forward
    only, no gradients): {"t5_encoder": ..., "vqgan_encoder": ...}, 0 for what it does not run.

    Streamed images go through the stage's tokenizer at its pixels (`config.<stage>.grid_size` x its
    factor) and, for super-res, through the base stage's too (the low-res tokens); a frozen T5
    (`config.text.trainable=False`) encodes the caption ids unless the embeddings are cached.
    """
    from muse_jax.models import t5
    from muse_jax.training import online

    source = step_source(config)
    out = {"t5_encoder": 0.0, "vqgan_encoder": 0.0}
    if source != "cache" and not config.text.trainable:
        out["t5_encoder"] = analytic_t5_encoder_flops(t5.T5Config.coerce(config.text.encoder), batch, text_length)
    if source == "images":
        for s in ("base",) if stage == "base" else ("base", "superres"):
            vcfg = online.stage_vqgan_config(config, s)
            out["vqgan_encoder"] += analytic_vqgan_encoder_flops(vcfg, batch, int(config[s].grid_size) * vcfg.factor)
    return out


def _analytic_flops(transformer: Mapping[str, float], in_step: Mapping[str, float]) -> dict[str, float]:
    """The plan's analytic FLOPs: the transformer's (`analytic_train_flops`), the frozen encoders' in the
    step, and `analytic_step`, all that the step executes (the transformer with remat + the encoders)."""
    return {"analytic_model": transformer["model"], "analytic_executed": transformer["executed"],
            "analytic_forward": transformer["forward"], "analytic_t5_encoder": in_step["t5_encoder"],
            "analytic_vqgan_encoder": in_step["vqgan_encoder"],
            "analytic_step": transformer["executed"] + in_step["t5_encoder"] + in_step["vqgan_encoder"]}


def _tree_bytes_per_device(tree, shardings) -> int:
    import jax

    total = 0
    for x, s in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(shardings)):
        shard = s.shard_shape(tuple(x.shape))
        total += math.prod(shard) * x.dtype.itemsize
    return total


def _first(cost):
    if isinstance(cost, (list, tuple)):
        return cost[0] if cost else {}
    return cost or {}


def plan(
    config,
    mesh: str | Mapping[str, int],
    accelerators: str | tuple[str, ...] = ("tpu_v4",),
    *,
    stage: str = "base",
    batch_size: int | None = None,
    remat: bool | None = None,
    text_length: int | None = None,
    keep_hlo: bool = False,
) -> dict[str, Any]:
    """Compiles `stage`'s training step for `mesh` on virtual devices; returns the plan (a dict).

    One compilation serves every accelerator in `accelerators` (names of `ACCELERATORS`).
    """
    sizes = parse_mesh(mesh)
    n = math.prod(sizes.values())
    accs = [accelerators] if isinstance(accelerators, str) else list(accelerators)
    for a in accs:
        accelerator(a)
    ensure_virtual_devices(n)

    import time

    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from muse_jax import workdir as workdir_lib
    from muse_jax.models import transformer as transformer_lib
    from muse_jax.training import checkpoint as ckpt_lib
    from muse_jax.training import online, partitioning
    from muse_jax.training import state as state_lib
    from muse_jax.training import step as step_lib

    config = config.copy_and_resolve_references()
    with config.unlocked():
        if batch_size is not None:
            config.train.batch_size = int(batch_size)
        if remat is not None:
            config[stage].remat = bool(remat)
        if text_length is not None:
            config.text.max_length = int(text_length)
    B = int(config.train.batch_size)
    L = int(config.text.max_length)
    devices = jax.devices()
    if len(devices) < n:
        raise RuntimeError(f"mesh {sizes} needs {n} devices, JAX has {len(devices)}")
    jmesh = partitioning.make_mesh(sizes, devices[:n])
    rules = partitioning.logical_rules(config)
    partitioning.check_batch_divides(B, jmesh, rules)

    t0 = time.perf_counter()
    model = workdir_lib.build_stage_model(config, stage)
    _, abstract, shardings = state_lib.state_setup(config, model, jmesh, rules)
    state = ckpt_lib.abstract_with_shardings(nn.unbox(abstract), shardings)

    inputs = transformer_lib.dummy_inputs(model, B, L)
    empty = {k: jnp.zeros(v.shape[1:], v.dtype) for k, v in inputs.items() if k.startswith("text")}
    source = step_source(config)
    prepare = None
    if source == "images":  # uint8 images at the stage's pixels and caption ids; tokens (and T5) in the step
        prepare = online.Prepare.abstract(config, stage, mesh=jmesh, rules=rules)
        px = prepare.image_size
        inputs = {"image": jax.ShapeDtypeStruct((B, px, px, 3), jnp.uint8),
                  "text_ids": jax.ShapeDtypeStruct((B, L), jnp.int32), "text_mask": inputs["text_mask"]}
    elif source == "tokens" and "text_emb" in inputs:  # the tokens as read; the frozen T5 in the step
        prepare = online.Prepare.abstract_text_only(config, mesh=jmesh, rules=rules)
        inputs["text_ids"] = jax.ShapeDtypeStruct((B, L), jnp.int32)
        del inputs["text_emb"]
    elif "text_emb" in inputs:  # cached frozen embeddings arrive in their cache dtype
        cache_dtype = jnp.dtype(config.text.get("cache_dtype", "float32"))
        inputs["text_emb"] = jax.ShapeDtypeStruct(inputs["text_emb"].shape, cache_dtype)
    batch_keys = {k: len(v.shape) for k, v in inputs.items()}
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=partitioning.batch_sharding(jmesh, rules, v.ndim))
             for k, v in inputs.items()}
    train_step = step_lib.make_train_step(config, model, jmesh, shardings, empty_text=empty, rules=rules,
                                          batch_keys=batch_keys, prepare=prepare)
    with partitioning.axis_rules(jmesh, rules):
        lowered = train_step.jitted.lower(state, batch, jax.random.key(0), None if prepare is None else prepare.frozen)
    t_lower = time.perf_counter() - t0
    compiled = lowered.compile()
    t_compile = time.perf_counter() - t0 - t_lower

    mem = compiled.memory_analysis()
    cost = _first(compiled.cost_analysis())
    hlo = compiled.as_text()
    comm = collective_bytes(hlo, n)
    comm_groups = collective_bytes(hlo, n, by_group=True)

    params_b = _tree_bytes_per_device(state.params, shardings.params)
    opt_b = _tree_bytes_per_device(state.opt_state, shardings.opt_state)
    ema_b = _tree_bytes_per_device(state.ema_params, shardings.ema_params) if state.ema_params is not None else 0
    frozen_b = _tree_bytes_per_device(prepare.frozen, prepare.shardings) if prepare is not None else 0
    arg_b, out_b = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes)
    alias_b, temp_b = int(mem.alias_size_in_bytes), int(mem.temp_size_in_bytes)
    mcfg = model.config
    analytic = analytic_train_flops(mcfg, B, L)
    in_step = in_step_flops(config, stage, B, L)
    axes = partitioning._batch_axes(rules)  # noqa: SLF001 (the rules' batch axes)
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    batch_shards = math.prod(jmesh.shape[a] for a in axes)
    activations = analytic_activation_bytes(mcfg, B // batch_shards, L)
    p = {
        "config": {"stage": stage, "batch_size": B, "batch_per_device": B // batch_shards, "text_length": L,
                   "remat": bool(mcfg.remat), "dtype": mcfg.dtype, "attention": mcfg.attention, "optimizer": config.train.optimizer,
                   "params": transformer_lib.count_params(state.params), "step_source": source,
                   "image_size": prepare.image_size if prepare is not None else 0,
                   "frozen_params": transformer_lib.count_params(prepare.frozen) if prepare is not None else 0},
        "mesh": sizes,
        "num_devices": n,
        "memory_per_device": {
            "params": params_b, "optimizer_state": opt_b, "ema_params": ema_b, "frozen_params": frozen_b,
            "arguments": arg_b, "outputs": out_b, "aliased": alias_b, "temporaries": temp_b,
            "peak": arg_b + out_b - alias_b + temp_b,
            "activations_analytic": activations,
            "activations_analytic_by_attention": _activations_by_attention(mcfg, B // batch_shards, L),
            # what must fit at least: the state, one gradient per parameter, the saved activations and
            # the frozen encoders' parameters that the step runs
            "state_grads_activations": params_b + opt_b + ema_b + params_b + activations + frozen_b,
        },
        "flops": {"xla_per_device": float(cost.get("flops", 0.0)), **_analytic_flops(analytic, in_step)},
        "bytes_accessed_per_device": float(cost.get("bytes accessed", 0.0)),
        "collective_bytes_per_device": comm,
        "collective_bytes_by_group": comm_groups,
        "compile_seconds": {"lower": t_lower, "compile": t_compile},
        **({"hlo": hlo} if keep_hlo else {}),
    }
    p["flops"]["xla_total"] = p["flops"]["xla_per_device"] * n
    p["flops"]["compute_per_device"] = compute_flops_per_device(mcfg, L, p["flops"]["xla_per_device"],
                                                                p["flops"]["analytic_step"], n)
    p["estimates"] = {a: estimate(p, a) for a in accs}
    return p


def _lerp(a, b, t):
    if isinstance(a, Mapping):
        return {k: _lerp(a.get(k, 0.0), b.get(k, 0.0), t) for k in set(a) | set(b)}
    if isinstance(a, bool) or not isinstance(a, (int, float)):
        return b
    return a + (b - a) * t


def plan_extrapolated(config, mesh, accelerators=("tpu_v4",), *, layers_from=(2, 4), stage: str = "base",
                      **kwargs) -> dict[str, Any]:
    """`plan` at depths `layers_from` = (a, b), extrapolated linearly to `config[stage].num_layers`."""
    a, b = (int(x) for x in layers_from)
    if not 0 < a < b:
        raise ValueError(f"layers_from={layers_from}: need two depths 0 < a < b")
    depth = int(config[stage].num_layers)
    accs = [accelerators] if isinstance(accelerators, str) else list(accelerators)
    small = []
    for d in (a, b):
        c = config.copy_and_resolve_references()
        with c.unlocked():
            c[stage].num_layers = d
        small.append(plan(c, mesh, accs, stage=stage, **kwargs))
    t = (depth - a) / (b - a)
    p = dict(small[1])
    for key in ("memory_per_device", "collective_bytes_per_device", "collective_bytes_by_group", "compile_seconds"):
        p[key] = _lerp(small[0][key], small[1][key], t)
    p["collective_bytes_per_device"] = {k: v for k, v in p["collective_bytes_per_device"].items() if v > 0}
    p["bytes_accessed_per_device"] = _lerp(small[0]["bytes_accessed_per_device"], small[1]["bytes_accessed_per_device"], t)
    p["config"] = dict(small[1]["config"], params=round(_lerp(small[0]["config"]["params"], small[1]["config"]["params"], t)))
    full = config.copy_and_resolve_references()
    with full.unlocked():
        for k, v in kwargs.items():
            if k == "batch_size" and v is not None:
                full.train.batch_size = int(v)
            if k == "remat" and v is not None:
                full[stage].remat = bool(v)
            if k == "text_length" and v is not None:
                full.text.max_length = int(v)
    from muse_jax.models import transformer as transformer_lib

    mcfg = transformer_lib.TransformerConfig.coerce(full[stage])
    B, L = int(full.train.batch_size), int(full.text.max_length)
    analytic = analytic_train_flops(mcfg, B, L)
    n = p["num_devices"]
    p["flops"] = {"xla_per_device": _lerp(small[0]["flops"]["xla_per_device"], small[1]["flops"]["xla_per_device"], t),
                  **_analytic_flops(analytic, in_step_flops(full, stage, B, L))}
    p["flops"]["xla_total"] = p["flops"]["xla_per_device"] * n
    p["flops"]["compute_per_device"] = compute_flops_per_device(mcfg, L, p["flops"]["xla_per_device"],
                                                                p["flops"]["analytic_step"], n)
    m = p["memory_per_device"]
    m["activations_analytic"] = analytic_activation_bytes(mcfg, p["config"]["batch_per_device"], L)
    m["activations_analytic_by_attention"] = _activations_by_attention(mcfg, p["config"]["batch_per_device"], L)
    m["state_grads_activations"] = (m["params"] * 2 + m["optimizer_state"] + m["ema_params"] + m["activations_analytic"]
                                    + m.get("frozen_params", 0))
    p["extrapolated_from_layers"] = [a, b]
    p["estimates"] = {name: estimate(p, name) for name in accs}
    return p


def communication_seconds(p: Mapping[str, Any], acc: Accelerator) -> float:
    """Collective time per step on `acc`.

    TPUs: all bytes over the chip's ICI bandwidth. GPU nodes (devices_per_node > 0), by group:
    inside one node (any device order), NVLink; a group of whole nodes, hierarchically (as NCCL does): all bytes over
    NVLink plus 1/devices_per_node of them over each GPU's own network link; a strided group (one
    GPU per node and group), all bytes over the network link.
    """
    groups = p.get("collective_bytes_by_group")
    if not acc.devices_per_node or not groups:
        return sum(p["collective_bytes_per_device"].values()) / acc.interconnect_bandwidth
    t, node = 0.0, acc.devices_per_node
    for key, nbytes in groups.items():
        size, kind, *block = key.split(":")
        size = int(size)
        block = int(block[0]) if block else (size if kind == "contiguous" else 0)
        if block and block <= node and node % block == 0:  # inside one node (strided or not)
            t += nbytes / acc.intra_node_bandwidth
        elif kind == "contiguous" and size % node == 0:
            t += nbytes / acc.intra_node_bandwidth + nbytes / node / acc.interconnect_bandwidth
        else:
            t += nbytes / acc.interconnect_bandwidth
    return t


EFFICIENCY = 0.5  # assumed share of peak FLOP/s that the step's kernels reach (for "predicted")


def estimate(p: Mapping[str, Any], accelerator_name: str, efficiency: float = EFFICIENCY) -> dict[str, Any]:
    """Step time bounds, a predicted step time, MFU and whether the state fits, on `accelerator_name`.

    predicted = compute / efficiency + communication (kernels at `efficiency` x peak, no overlap).
    The compute includes the frozen encoders that the step runs; MFU counts the transformer's model
    FLOPs only (`analytic_model`, as `train`'s perf/mfu does).
    """
    acc = accelerator(accelerator_name)
    n = p["num_devices"]
    t_compute = p["flops"].get("compute_per_device", p["flops"]["xla_per_device"]) / acc.peak_flops
    t_memory = p["bytes_accessed_per_device"] / acc.hbm_bandwidth
    t_comm = communication_seconds(p, acc)
    # XLA:CPU's bytes accessed count unfused operands: far above what TPU/GPU fusion reads, so
    # HBM time is reported but not used in the bounds.
    low = max(t_compute, t_comm)
    high = t_compute + t_comm
    predicted = t_compute / efficiency + t_comm
    model = p["flops"]["analytic_model"]
    return {
        "accelerator": dataclasses.asdict(acc),
        "fits": p["memory_per_device"]["state_grads_activations"] <= 0.9 * acc.hbm_bytes,
        "fits_xla_cpu_peak": p["memory_per_device"]["peak"] <= acc.hbm_bytes,
        "step_time_s": {"compute": t_compute, "hbm": t_memory, "communication": t_comm,
                        "lower_bound": low, "no_overlap": high, "predicted": predicted, "efficiency": efficiency},
        "mfu": {"upper_bound": model / (low * n * acc.peak_flops) if low else 0.0,
                "no_overlap": model / (high * n * acc.peak_flops) if high else 0.0,
                "predicted": model / (predicted * n * acc.peak_flops) if predicted else 0.0},
    }


def _gib(b: float) -> str:
    return f"{b / GiB:.2f} GiB"


def format_plan(p: Mapping[str, Any]) -> str:
    """A human-readable summary of `plan`'s result."""
    c, m, f = p["config"], p["memory_per_device"], p["flops"]
    mesh = ",".join(f"{k}={v}" for k, v in p["mesh"].items())
    frozen = [name for name, key in (("T5 encoder", "analytic_t5_encoder"), ("VQGAN encoder(s)", "analytic_vqgan_encoder"))
              if f.get(key)]
    source = {"images": f"{c.get('image_size')} px images and caption ids, tokenized in the step",
              "tokens": "tokens computed once and caption ids", "cache": "cached tokens and text"}
    lines = [
        f"plan: {c['stage']} ({c['params'] / 1e9:.3f}B params, {c['dtype']}, {c['optimizer']}, remat={c['remat']}), "
        f"batch {c['batch_size']}, text length {c['text_length']}, mesh {mesh} ({p['num_devices']} devices)",
        f"step input: {source.get(c.get('step_source', 'cache'))}"
        + (f"; frozen in the step: {', '.join(frozen)}" if frozen else ""),
        "memory per device (state and frozen parameters: exact from the shardings; the rest: XLA memory analysis):",
        f"  params {_gib(m['params'])}, optimizer state {_gib(m['optimizer_state'])}"
        + (f", ema {_gib(m['ema_params'])}" if m["ema_params"] else ""),
        *([f"  frozen parameters ({', '.join(frozen)}; {c['frozen_params'] / 1e9:.3f}B) {_gib(m['frozen_params'])}"]
          if m.get("frozen_params") else []),
        f"  arguments {_gib(m['arguments'])}, outputs {_gib(m['outputs'])}, aliased (donated) {_gib(m['aliased'])}, "
        f"temporaries (activations, gradients) {_gib(m['temporaries'])}",
        f"  peak {_gib(m['peak'])} (XLA:CPU); analytic saved activations {_gib(m['activations_analytic'])}; "
        f"state + grads + activations{' + frozen' if m.get('frozen_params') else ''} {_gib(m['state_grads_activations'])}",
        "  analytic saved activations by attention: "
        + ", ".join(f"{a} {_gib(b)}" for a, b in m.get("activations_analytic_by_attention", {}).items())
        + f" (this config: {c.get('attention', 'xla')})",
        f"FLOPs per step: XLA {f['xla_total']:.3e} ({f['xla_per_device']:.3e} per device); analytic: transformer "
        f"model {f['analytic_model']:.3e}, executed with remat {f['analytic_executed']:.3e}"
        + (f"; frozen forward: T5 encoder {f.get('analytic_t5_encoder', 0.0):.3e}, VQGAN encoder(s) "
           f"{f.get('analytic_vqgan_encoder', 0.0):.3e}; step {f['analytic_step']:.3e}" if frozen else "")
        + ("; compute time from the analytic count (XLA counts the blockwise attention's loop bodies once)"
           if f.get("compute_per_device", f["xla_per_device"]) != f["xla_per_device"] else ""),
        f"HBM traffic per device (XLA estimate): {p['bytes_accessed_per_device'] / 1e9:.2f} GB",
        "communication per device: "
        + (", ".join(f"{k} {v / 1e9:.3f} GB" for k, v in p["collective_bytes_per_device"].items()) or "none"),
    ]
    for name, e in p.get("estimates", {}).items():
        t, acc = e["step_time_s"], e["accelerator"]
        lines.append(
            f"{name} ({acc['name']}, {_gib(acc['hbm_bytes'])}): {'fits' if e['fits'] else 'DOES NOT FIT'} "
            f"(state+grads+activations{'+frozen' if m.get('frozen_params') else ''} <= 90% HBM; "
            f"XLA:CPU peak {'fits' if e['fits_xla_cpu_peak'] else 'too big'}); "
            f"step: compute at peak {t['compute']:.3f}s, communication {t['communication']:.3f}s -> "
            f"bounds {t['lower_bound']:.3f}s (overlapped, at peak) .. {t['no_overlap']:.3f}s (serial); predicted "
            f"{t['predicted']:.3f}s at {t['efficiency']:.0%} of peak, MFU {e['mfu']['predicted']:.1%} "
            f"(at most {e['mfu']['upper_bound']:.1%}{'; transformer FLOPs only' if frozen else ''}) "
            f"[HBM time per XLA:CPU bytes: {t['hbm']:.3f}s]"
        )
    cs = p["compile_seconds"]
    if "extrapolated_from_layers" in p:
        a, b = p["extrapolated_from_layers"]
        lines.append(f"(extrapolated linearly from compiles with {a} and {b} blocks)")
    else:
        lines.append(f"(traced in {cs['lower']:.1f}s, compiled in {cs['compile']:.1f}s on the CPU)")
    return "\n".join(lines)
