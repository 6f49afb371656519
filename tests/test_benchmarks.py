"""The benchmark scripts run (smoke sizes) and report what they claim; no timing is asserted."""
import json
import math
import pathlib
import subprocess
import sys

import pytest

BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
SMOKE = ["--depth", "1", "--width", "32", "--heads", "2", "--tokens", "16", "--codebook", "32", "--text-len", "4",
         "--text-width", "16", "--batch", "2", "--steps", "2", "--warmup", "1"]


def _run(script, *args):
    out = subprocess.run([sys.executable, str(BENCH / script), *SMOKE, *args], cwd=BENCH, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_train_step_and_decode_benchmarks_report_json():
    from muse_jax import precision

    train = json.loads(_run("train_step.py", "--json", "--no-peak"))
    assert train["bench"] == "train_step" and train["ms_per_step"] > 0 and train["model_gflops"] > 0
    assert train["tokens"] == 16 and train["batch"] == 2 and "only 2 timed" in train["warning"]
    assert train["matmul_precision"] == "default" and train["matmul"] == precision.multiplies("default")
    # the blocks on 2x2 patches (4 positions instead of 16 tokens): fewer model FLOPs, the planner's count
    patched = json.loads(_run("train_step.py", "--json", "--no-peak", "--patch", "2"))
    assert train["patch"] == 1 and patched["patch"] == 2
    assert 0 < patched["model_gflops"] < train["model_gflops"]
    decode = json.loads(_run("sample.py", "--json", "--no-peak", "--matmul", "float32"))
    assert decode["bench"] == "decode" and decode["s_per_batch"] > 0 and decode["decode_steps"] == 12
    assert decode["matmul_precision"] == "highest" and decode["matmul"] == "float32"


def test_compare_pairs_each_of_our_rows_with_each_peer_row_of_the_same_model():
    sys.path.insert(0, str(BENCH))
    try:
        import compare
    finally:
        sys.path.remove(str(BENCH))
    key = {"bench": "train_step", "config": "small", "dtype": "float32"}
    rows = [{**key, "impl": "muse_jax", "matmul": "bfloat16", "ms_per_step": 100.0},
            {**key, "impl": "muse_jax", "matmul": "float32", "ms_per_step": 200.0},
            {**key, "impl": "aMUSEd", "matmul": "float32", "ms_per_step": 150.0},
            {**key, "impl": "aMUSEd", "matmul": "bfloat16", "ms_per_step": 80.0},
            {**key, "config": "medium", "impl": "aMUSEd", "ms_per_step": 1.0}]  # no row of ours: no ratio
    got = {(r["ours_matmul"], r["peer_matmul"]): r.get("speedup") for r in compare.ratios(rows)}
    assert got == {("bfloat16", "float32"): 1.5, ("float32", "float32"): 0.75, ("bfloat16", "bfloat16"): 0.8,
                   ("float32", "bfloat16"): 0.4, (None, "float32"): None}


@pytest.mark.parametrize("what, phases", [("train", ("forward", "backward")), ("decode", ("decode loop",))])
def test_profile_step_attributes_time_to_ops(tmp_path, what, phases):
    text = _run("profile_step.py", "--what", what, "--out", str(tmp_path))
    assert "ms inside thunks" in text and "by kind" in text
    for phase in phases:
        assert phase in text
    assert (tmp_path / "compiled_hlo.txt").read_text().startswith("HloModule")
    assert list((tmp_path / "trace").glob("**/*.xplane.pb"))


def test_amused_pipeline_benchmark_times_both_sides_on_the_same_weights():
    out = subprocess.run([sys.executable, str(BENCH / "amused_pipeline.py"), "--size", "tiny", "--batch", "2",
                          "--repeats", "1", "--matmul", "float32", "--memory", "--json"], cwd=BENCH,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    timed = {r["impl"]: r for r in rows if "impl" in r}
    assert set(timed) == {"muse_jax", "diffusers"} and timed["muse_jax"]["batch"] == timed["diffusers"]["batch"] == 2
    ours, theirs = timed["muse_jax"], timed["diffusers"]
    assert ours["speedup"] == pytest.approx(ours["images_per_s"] / theirs["images_per_s"])
    (memory,) = [r for r in rows if "impl" not in r]
    # the parameters are among the program's arguments (float32: 4 bytes each)
    assert memory["argument_gib"] * 2**30 >= 4 * memory["params"] and memory["temp_gib"] > 0


def test_finetune_shapes_runs_end_to_end_and_prints_its_table():
    pytest.importorskip("diffusers")
    out = subprocess.run([sys.executable, str(BENCH / "finetune_shapes.py"), "--size", "tiny", "--tokenizer-steps", "1",
                          "--tokenizer-eval-images", "4", "--num-train", "8", "--steps", "2", "--batch", "2", "--eval", "4",
                          "--sample-batch", "4", "--matmul", "float32"], cwd=BENCH, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    header, rule, *rows = [line.strip("|").split("|") for line in out.stdout.splitlines() if line.startswith("|")]
    header = [h.strip() for h in header]
    assert [r[0].strip() for r in rows] == ["test images through the VQGAN", "untouched W", "fine-tuned W"]
    tuned = dict(zip(header, (c.strip() for c in rows[-1])))
    assert tuned["step"] == "2" and all(math.isfinite(float(tuned[k])) for k in ("loss first", "loss last"))
    for r in rows:
        for k in ("count", "color", "shape", "all"):
            assert 0.0 <= float(dict(zip(header, r))[k]) <= 1.0
    assert "command: python benchmarks/finetune_shapes.py --size tiny" in out.stdout
