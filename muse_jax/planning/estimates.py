"""Accelerators and what a compiled plan means on them: step time, MFU, whether it fits, the printed plan.

  - `ACCELERATORS` (vendor figures: peak bf16 FLOP/s, HBM, interconnect), `accelerator(name)`;
  - `communication_seconds`: a plan's collective bytes over the chip's links (NVLink inside a GPU
    node, the network between nodes, ICI on TPUs);
  - `estimate`: step-time bounds, the predicted step time at EFFICIENCY of peak, MFU, "fits";
  - `format_plan`: the human-readable summary `muse-jax plan` prints.
"""
from __future__ import annotations

import dataclasses
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
    amused = c.get("family") == "amused"
    encoders = (("CLIP text encoder", "analytic_clip_encoder"), ("VQGAN encoder", "analytic_vqgan_encoder")) if amused \
        else (("T5 encoder", "analytic_t5_encoder"), ("VQGAN encoder(s)", "analytic_vqgan_encoder"))
    frozen = [name for name, key in encoders if f.get(key)]
    source = {"images": f"{c.get('image_size')} px images and caption ids, tokenized in the step",
              "tokens": "tokens computed once and caption ids", "cache": "cached tokens and text"}
    if amused:
        trained = (f"LoRA rank {c['lora_rank']}: {c['params'] / 1e6:.2f}M adapter params trained, "
                   f"{c['base_params'] / 1e9:.3f}B frozen" if c.get("lora_rank") else f"{c['params'] / 1e9:.3f}B params")
        header = (f"plan: aMUSEd UVit2D fine-tune ({trained}; params {c['param_dtype']}, compute {c['dtype']}, "
                  f"{c['optimizer']} state {c['optimizer_state_dtype']}, remat={c['remat']})")
    else:
        header = f"plan: {c['stage']} ({c['params'] / 1e9:.3f}B params, {c['dtype']}, {c['optimizer']}, remat={c['remat']})"
    plus_frozen = " + frozen" if m.get("frozen_params") or m.get("base_params") else ""
    lines = [
        f"{header}, batch {c['batch_size']}, text length {c['text_length']}, mesh {mesh} ({p['num_devices']} devices)",
        f"step input: {source.get(c.get('step_source', 'cache'))}"
        + (f"; frozen in the step: {', '.join(frozen)}" if frozen else ""),
        "memory per device (state and frozen parameters: exact from the shardings; the rest: XLA memory analysis):",
        f"  params {_gib(m['params'])}, optimizer state {_gib(m['optimizer_state'])}"
        + (f", ema {_gib(m['ema_params'])}" if m["ema_params"] else "")
        + (f", frozen UVit2D weights (LoRA base) {_gib(m['base_params'])}" if m.get("base_params") else ""),
        *([f"  frozen parameters ({', '.join(frozen)}; {c['frozen_params'] / 1e9:.3f}B) {_gib(m['frozen_params'])}"]
          if m.get("frozen_params") else []),
        f"  arguments {_gib(m['arguments'])}, outputs {_gib(m['outputs'])}, aliased (donated) {_gib(m['aliased'])}, "
        f"temporaries (activations, gradients) {_gib(m['temporaries'])}",
        f"  peak {_gib(m['peak'])} (XLA:CPU); analytic saved activations {_gib(m['activations_analytic'])}; "
        f"state + grads + activations{plus_frozen} {_gib(m['state_grads_activations'])}",
        *([] if amused else [
            "  analytic saved activations by attention: "
            + ", ".join(f"{a} {_gib(b)}" for a, b in m.get("activations_analytic_by_attention", {}).items())
            + f" (this config: {c.get('attention', 'xla')})"]),
        f"FLOPs per step: XLA {f['xla_total']:.3e} ({f['xla_per_device']:.3e} per device); analytic: "
        f"{'UVit2D' if amused else 'transformer'} model {f['analytic_model']:.3e}, executed with remat "
        f"{f['analytic_executed']:.3e}"
        + (f"; frozen forward: {', '.join(f'{name} {f.get(key, 0.0):.3e}' for name, key in encoders)}; "
           f"step {f['analytic_step']:.3e}" if frozen else "")
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
            f"(state+grads+activations{plus_frozen.replace(' ', '')} <= 90% HBM; "
            f"XLA:CPU peak {'fits' if e['fits_xla_cpu_peak'] else 'too big'}); "
            f"step: compute at peak {t['compute']:.3f}s, communication {t['communication']:.3f}s -> "
            f"bounds {t['lower_bound']:.3f}s (overlapped, at peak) .. {t['no_overlap']:.3f}s (serial); predicted "
            f"{t['predicted']:.3f}s at {t['efficiency']:.0%} of peak, MFU {e['mfu']['predicted']:.1%} "
            f"(at most {e['mfu']['upper_bound']:.1%}{'; transformer FLOPs only' if frozen and not amused else ''}"
            f"{'; UVit2D FLOPs only' if amused else ''}) "
            f"[HBM time per XLA:CPU bytes: {t['hbm']:.3f}s]"
        )
    cs = p["compile_seconds"]
    if "extrapolated_from_layers" in p:
        a, b = p["extrapolated_from_layers"]
        lines.append(f"(extrapolated linearly from compiles with {a} and {b} blocks)")
    else:
        lines.append(f"(traced in {cs['lower']:.1f}s, compiled in {cs['compile']:.1f}s on the CPU)")
    return "\n".join(lines)
