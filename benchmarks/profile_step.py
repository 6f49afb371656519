"""Where the time of our training step (or decode) goes: a jax.profiler trace, grouped by HLO op.

    python benchmarks/profile_step.py --config small                 # training step, table
    python benchmarks/profile_step.py --config medium --what decode  # the 12-step guided decode
    python benchmarks/profile_step.py --config small --top 40 --out /tmp/prof   # keep trace + HLO

Compiles the same program as `train_step.py` (or `sample.py`), runs it `--warmup` times, then
traces `--steps` runs with `jax.profiler` and reads the trace back (`jax.profiler.ProfileData`).
On CPU every executed HLO instruction (a "thunk": a fusion, a dot, a copy) is one trace event
named after the instruction; the compiled module's text maps each name to its opcode and its
`op_name` metadata (the JAX source path, e.g. `transpose(jvp(MuseBase))/decoder/block_3/mlp/wi`).
Printed per run of the program: the total time inside thunks, that time by kind (library matmul
fusions, other dots, copies/transposes, elementwise loop fusions, ...), by phase (forward,
backward, optimizer) and the `--top` op_names (block numbers folded together) with their kind.

Thunk times add up across the threads that run them: their sum can exceed the wall time when
independent thunks run concurrently. On GPU the thunk names differ; use TensorBoard/xprof on the
trace kept with `--out` instead.
"""
from __future__ import annotations

import argparse
import collections
import re
import sys
import tempfile
from pathlib import Path

import common
import jax
import sample as sample_bench
import train_step as train_bench

from muse_jax import partitioning

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = \S+ (\w+)\((.*)$", re.M)


def compiled_train_step(shape: common.ModelShape, seed: int = 0, matmul: str | None = None):
    """(call) running one training step of `train_step.py`'s program, and its compiled executable."""
    step, state, batch, rng = train_bench.build_step(shape, seed, matmul_precision=common.jax_matmul_precision(matmul))
    with partitioning.axis_rules(step.mesh, step.rules):
        compiled = step.jitted.lower(state, batch, rng, None).compile()
    holder = {"state": state}

    def call():
        holder["state"], metrics = compiled(holder["state"], batch, rng, None)
        return metrics

    return call, compiled


def compiled_decode(shape: common.ModelShape, seed: int = 0, matmul: str | None = None):
    """(call) running `sample.py`'s 12-step guided decode once, and its compiled executable."""
    args = argparse.Namespace(seed=seed, decode_steps=12, guidance=3.0, no_guidance=False, matmul=matmul)
    program, call_args = sample_bench.build_program(shape, args)
    compiled = program.lower(*call_args).compile()
    return (lambda: compiled(*call_args)), compiled


def instruction_info(hlo_text: str) -> dict[str, tuple[str, str]]:
    """HLO instruction name -> (kind, op_name metadata) from a compiled module's text."""
    info = {}
    for name, opcode, rest in _INSTRUCTION.findall(hlo_text):
        fusion = re.search(r"kind=(\w+)", rest)
        op_name = re.search(r'op_name="([^"]*)"', rest)
        if "ynn_fusion" in name or "xnn_fusion" in name or "onednn" in name:  # onednn: one dot each
            kind = "library fusion (matmul, + fused ops)"
        elif opcode == "dot":
            kind = "dot (XLA/Eigen)"
        elif "copy" in name or "transpose" in name or opcode in ("copy", "transpose"):
            kind = "copy / transpose"
        elif opcode == "fusion":
            kind = f"fusion ({fusion.group(1) if fusion else '?'})"
        else:
            kind = opcode
        info[name] = (kind, op_name.group(1) if op_name else "")
    return info


def phase(op_name: str) -> str:
    if "transpose(jvp(" in op_name:
        return "backward"
    if "jvp(" in op_name:
        return "forward"
    if "/while/" in op_name:
        return "decode loop"
    return "optimizer, loss and the rest"


def thunk_times(trace_dir: Path, names: set[str], runs: int) -> dict[str, float]:
    """Milliseconds per run spent in each HLO instruction, from the newest trace in `trace_dir`."""
    files = sorted(trace_dir.glob("**/*.xplane.pb"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise RuntimeError(f"jax.profiler wrote no trace under {trace_dir}")
    data = jax.profiler.ProfileData.from_file(str(files[-1]))
    out: dict[str, float] = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            for event in line.events:
                if event.name in names:
                    out[event.name] += event.duration_ns / 1e6 / runs
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_flags(ap, steps=5, warmup=2)
    ap.add_argument("--what", choices=("train", "decode"), default="train")
    ap.add_argument("--top", type=int, default=25, help="how many op_names to list")
    ap.add_argument("--out", type=Path, help="keep the trace and the compiled HLO text here")
    args = ap.parse_args(argv)
    try:
        shape = common.shape_from_args(args)
    except ValueError as e:
        ap.error(str(e))
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    call, compiled = (compiled_train_step if args.what == "train" else compiled_decode)(shape, args.seed, args.matmul)
    hlo = compiled.as_text()
    info = instruction_info(hlo)
    out = args.out or Path(tempfile.mkdtemp(prefix="muse_profile_"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "compiled_hlo.txt").write_text(hlo)
    wall = common.time_calls(call, jax.block_until_ready, args.steps, args.warmup)
    jax.profiler.start_trace(str(out / "trace"))
    for _ in range(args.steps):
        jax.block_until_ready(call())
    jax.profiler.stop_trace()
    times = thunk_times(out / "trace", set(info), args.steps)
    if not times:
        sys.exit("no HLO instruction names in the trace (not a CPU run?): open the trace in TensorBoard/xprof")

    total = sum(times.values())
    by_kind, by_phase, by_op = collections.Counter(), collections.Counter(), collections.Counter()
    for name, ms in times.items():
        kind, op_name = info[name]
        by_kind[kind] += ms
        by_phase[phase(op_name)] += ms
        short = re.sub(r"block_\d+", "block_*", op_name.split("/", 1)[-1]) or name
        by_op[(short, kind)] += ms
    print(f"{shape.config} {args.what} ({shape.dtype}, batch {shape.batch}): wall {1e3 * common.median(wall):.1f} ms "
          f"per run (median of {args.steps}), {total:.1f} ms inside thunks; trace and HLO in {out}")
    for title, table in (("by kind", by_kind), ("by phase", by_phase)):
        rows = [{"what": k, "ms": v, "share": v / total} for k, v in table.most_common()]
        print(f"\n{title}\n" + common.format_table(rows, [("what", title[3:], ""), ("ms", "ms/run", ".1f"),
                                                            ("share", "share", ".1%")]))
    rows = [{"op": k[0][:100], "kind": k[1], "ms": v, "share": v / total} for k, v in by_op.most_common(args.top)]
    print(f"\ntop {args.top} op_names\n" + common.format_table(
        rows, [("op", "op_name", ""), ("kind", "kind", ""), ("ms", "ms/run", ".2f"), ("share", "share", ".1%")]))


if __name__ == "__main__":
    main()
