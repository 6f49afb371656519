"""The benchmark scripts run (smoke sizes) and report what they claim; no timing is asserted."""
import json
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
    train = json.loads(_run("train_step.py", "--json", "--no-peak"))
    assert train["bench"] == "train_step" and train["ms_per_step"] > 0 and train["model_gflops"] > 0
    assert train["tokens"] == 16 and train["batch"] == 2 and "only 2 timed" in train["warning"]
    decode = json.loads(_run("sample.py", "--json", "--no-peak"))
    assert decode["bench"] == "decode" and decode["s_per_batch"] > 0 and decode["decode_steps"] == 12


@pytest.mark.parametrize("what, phases", [("train", ("forward", "backward")), ("decode", ("decode loop",))])
def test_profile_step_attributes_time_to_ops(tmp_path, what, phases):
    text = _run("profile_step.py", "--what", what, "--out", str(tmp_path))
    assert "ms inside thunks" in text and "by kind" in text
    for phase in phases:
        assert phase in text
    assert (tmp_path / "compiled_hlo.txt").read_text().startswith("HloModule")
    assert list((tmp_path / "trace").glob("**/*.xplane.pb"))
