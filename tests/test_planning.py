"""The planner: compiled-step memory, FLOPs and communication on small virtual meshes vs analytic counts."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import types

import conftest
import pytest
from _multidevice import run_with_devices

from muse_jax import planning

SMALL = [
    "--config.base.num_layers=2", "--config.base.width=256", "--config.base.mlp_dim=1024",
    "--config.base.num_heads=4", "--config.base.codebook_size=256", "--config.base.text_dim=64",
    "--config.text.trainable=False", "--config.text.max_length=16", "--config.train.batch_size=16",
]


@pytest.fixture(scope="module")
def plans():
    """Plans of one small base model: 1 device; DP over 4; FSDP over 4; FSDP over 4 with remat."""
    code = f"""
import json
from muse_jax import config as config_lib, planning
cfg = config_lib.load_config("shapes", {SMALL!r})
out = {{}}
for name, mesh, remat in [("one", "data=1", False), ("dp", "data=4", False), ("fsdp", "fsdp=4", False),
                          ("fsdp_remat", "fsdp=4", True)]:
    out[name] = planning.plan(cfg, mesh, ("tpu_v4", "h100"), remat=remat)
deep = config_lib.load_config("shapes", {SMALL!r} + ["--config.base.num_layers=4"])
out["deep"] = planning.plan(deep, "fsdp=4", ("tpu_v4",))
out["deep_extrapolated"] = planning.plan_extrapolated(deep, "fsdp=4", ("tpu_v4",), layers_from=(1, 2))
print("PLANS" + json.dumps(out))
"""
    stdout = run_with_devices(code, n=4, timeout=600)
    line = [l for l in stdout.splitlines() if l.startswith("PLANS")][-1]
    return json.loads(line[len("PLANS"):])


def test_state_memory_matches_parameter_count(plans):
    n = plans["one"]["config"]["params"]
    one, dp, fsdp = plans["one"]["memory_per_device"], plans["dp"]["memory_per_device"], plans["fsdp"]["memory_per_device"]
    assert one["params"] == dp["params"] == 4 * n  # float32, replicated under DP
    assert 2 * one["params"] <= one["optimizer_state"] <= 2 * one["params"] + 64  # AdamW mu, nu (+ counts)
    # FSDP shards every matrix along `embed`: a quarter, plus the few replicated vectors
    assert one["params"] / 4 <= fsdp["params"] < 0.27 * one["params"]
    assert fsdp["optimizer_state"] < 0.27 * one["optimizer_state"]
    # XLA's arguments hold the state (and the batch shard); the state is donated
    for m in (one, dp, fsdp):
        assert m["params"] + m["optimizer_state"] <= m["arguments"] <= 1.05 * (m["params"] + m["optimizer_state"]) + 2**20
        assert m["aliased"] >= m["params"] + m["optimizer_state"] - 64
        assert m["peak"] == m["arguments"] + m["outputs"] - m["aliased"] + m["temporaries"]
    # the un-rematerialised program must hold the saved activations at once
    assert one["temporaries"] >= one["activations_analytic"]


def test_flops_match_analytic_count_and_split_over_devices(plans):
    one, dp, fsdp, remat = (plans[k]["flops"] for k in ("one", "dp", "fsdp", "fsdp_remat"))
    assert one["xla_per_device"] == pytest.approx(one["analytic_model"], rel=0.05)
    for p in (dp, fsdp):  # SPMD: each device does a quarter of the work
        assert p["xla_per_device"] == pytest.approx(one["xla_per_device"] / 4, rel=0.05)
        assert p["xla_total"] == pytest.approx(one["xla_total"], rel=0.05)
    # remat recomputes the blocks' forward pass: most of the analytic extra shows up in XLA's count
    extra = (remat["analytic_executed"] - remat["analytic_model"]) / 4
    assert extra > 0.1 * remat["analytic_model"] / 4
    assert 0.6 * extra <= remat["xla_per_device"] - fsdp["xla_per_device"] <= 1.1 * extra


def test_collectives_match_the_parallelism(plans):
    param_bytes = plans["one"]["memory_per_device"]["params"]
    assert plans["one"]["collective_bytes_per_device"] == {}
    dp = plans["dp"]["collective_bytes_per_device"]
    # data parallel: one all-reduce of the float32 gradients, 2·(g-1)/g of their size per device (ring)
    assert dp["all-reduce"] == pytest.approx(2 * 3 / 4 * param_bytes, rel=0.05)
    fsdp = plans["fsdp"]["collective_bytes_per_device"]
    # FSDP: parameters all-gathered before use ((g-1)/g of their size), gradients reduced
    assert fsdp["all-gather"] >= 0.9 * 3 / 4 * param_bytes
    reduce = fsdp.get("reduce-scatter", 0) * 2 + fsdp.get("all-reduce", 0)  # XLA:CPU keeps all-reduce
    assert reduce >= 0.9 * 2 * 3 / 4 * param_bytes * 0.95
    # remat all-gathers the parameters again for the recomputation
    assert plans["fsdp_remat"]["collective_bytes_per_device"]["all-gather"] > 1.5 * fsdp["all-gather"]


def test_extrapolation_from_shallow_compiles_matches_full_compile(plans):
    full, ext = plans["deep"], plans["deep_extrapolated"]
    assert ext["extrapolated_from_layers"] == [1, 2] and ext["config"]["params"] == full["config"]["params"]
    for k in ("params", "optimizer_state", "arguments", "outputs", "aliased"):
        assert ext["memory_per_device"][k] == pytest.approx(full["memory_per_device"][k], rel=1e-6), k
    assert ext["flops"]["xla_per_device"] == pytest.approx(full["flops"]["xla_per_device"], rel=0.01)
    assert ext["flops"]["analytic_model"] == full["flops"]["analytic_model"]
    for k, v in full["collective_bytes_per_device"].items():
        assert ext["collective_bytes_per_device"][k] == pytest.approx(v, rel=0.02), k
    # XLA:CPU's temporaries are only roughly linear in depth
    assert ext["memory_per_device"]["temporaries"] == pytest.approx(full["memory_per_device"]["temporaries"], rel=0.3)


def test_estimates_use_the_accelerator_table(plans):
    p = plans["fsdp"]
    for name in ("tpu_v4", "h100"):
        e, acc = p["estimates"][name], planning.ACCELERATORS[name]
        t = e["step_time_s"]
        assert t["compute"] == pytest.approx(p["flops"]["xla_per_device"] / acc.peak_flops)
        # 4 consecutive devices: one H100 node (NVLink); TPU chips: ICI
        bandwidth = acc.intra_node_bandwidth if name == "h100" else acc.interconnect_bandwidth
        assert t["communication"] == pytest.approx(sum(p["collective_bytes_per_device"].values()) / bandwidth)
        assert t["lower_bound"] == max(t["compute"], t["communication"]) <= t["no_overlap"]
        assert t["predicted"] == pytest.approx(t["compute"] / planning.EFFICIENCY + t["communication"])
        mfu = p["flops"]["analytic_model"] / (t["lower_bound"] * 4 * acc.peak_flops)
        assert e["mfu"]["upper_bound"] == pytest.approx(mfu) and 0 < mfu <= 1
        assert e["mfu"]["predicted"] < e["mfu"]["upper_bound"]
        assert e["fits"]


def test_analytic_flops_by_hand():
    """One block, E=2, M=4, N=4 tokens, T=2 text, D=3, K=5, 1 head: count every matmul by hand."""
    cfg = types.SimpleNamespace(width=2, mlp_dim=4, codebook_size=5, grid_size=2, text_dim=3, num_layers=1,
                                num_heads=1, lowres_grid_size=0, num_lowres_layers=0, remat=False, dtype="float32",
                                dropout_rate=0.0)
    N, T, E, M, D, K = 4, 2, 2, 4, 3, 5
    self_attn = 4 * (2 * N * E * E) + 2 * (2 * N * N * E)  # q,k,v,o projections; scores; weighted sum
    cross = 2 * (2 * N * E * E) + 2 * (2 * T * E * E) + 2 * (2 * N * T * E)
    mlp = 2 * N * E * M * 2
    rest = 2 * T * D * E + 2 * N * E * E + 2 * N * E * K  # text projection, head dense, logits
    fwd = self_attn + cross + mlp + rest
    assert planning.analytic_forward_flops(cfg, 3, T) == 3 * fwd
    got = planning.analytic_train_flops(cfg, 3, T)
    assert got["model"] == got["executed"] == 3 * (3 * fwd - 2 * T * D * E)
    # 2x2 patches: the block runs on P = 1 position; the patch projections map 4E <-> E
    patched = types.SimpleNamespace(**dict(vars(cfg), patch_size=2))
    P = 1
    self_attn = 4 * (2 * P * E * E) + 2 * (2 * P * P * E)
    cross = 2 * (2 * P * E * E) + 2 * (2 * T * E * E) + 2 * (2 * P * T * E)
    mlp = 2 * P * E * M * 2
    patches = 2 * P * (4 * E) * E + 2 * P * E * (4 * E)
    assert planning.analytic_forward_flops(patched, 3, T) == 3 * (self_attn + cross + mlp + patches + rest)


def test_analytic_activations_without_the_attention_probabilities():
    """Blockwise attention saves no [lq, lk] probabilities: exactly h·lq·lk·(4 + s) per attention less."""
    cfg = types.SimpleNamespace(width=8, mlp_dim=16, codebook_size=5, grid_size=4, text_dim=3, num_layers=2,
                                num_heads=2, lowres_grid_size=2, num_lowres_layers=3, remat=False,
                                dtype="bfloat16", dropout_rate=0.0, attention="xla")
    N, n, T, h, s, batch = 16, 4, 6, 2, 2, 3
    xla = planning.analytic_activation_bytes(cfg, batch, T)
    blockwise = planning.analytic_activation_bytes(cfg, batch, T, attention="blockwise")
    probs = 2 * (N * N + N * (T + n)) + 3 * n * n  # decoder self + cross, encoder self
    assert xla - blockwise == batch * h * probs * (4 + s)
    assert planning.analytic_activation_bytes(cfg, batch, T, attention="auto") == xla  # short: the xla path
    remat = planning.analytic_activation_bytes(cfg, batch, T, remat=True, attention="blockwise")
    assert remat < blockwise
    # ... and recomputes the logits q·k in its backward pass, inside loops whose bodies XLA counts once
    flops = {a: planning.analytic_train_flops(cfg, batch, T, attention=a) for a in ("xla", "blockwise")}
    assert flops["blockwise"]["executed"] - flops["xla"]["executed"] == batch * 2 * 8 * probs
    assert flops["blockwise"]["model"] == flops["xla"]["model"]
    assert planning.compute_flops_per_device(cfg, T, 1e3, 8e3, 4) == 1e3  # xla attention: XLA's count
    blockwise_cfg = types.SimpleNamespace(**dict(vars(cfg), attention="blockwise"))
    assert planning.compute_flops_per_device(blockwise_cfg, T, 1e3, 8e3, 4) == 2e3


def test_communication_inside_and_between_nodes():
    p = {"collective_bytes_per_device": {"all-reduce": 3e9},
         "collective_bytes_by_group": {"8:contiguous": 1e9, "8:strided": 1e9, "64:contiguous": 1e9}}
    h100 = planning.ACCELERATORS["h100"]
    # inside a node: NVLink; strided: the network; 8 whole nodes: NVLink + 1/8 over each GPU's link
    assert planning.communication_seconds(p, h100) == pytest.approx(1e9 / 900e9 + 1e9 / 50e9
                                                                    + 1e9 / 900e9 + 1e9 / 8 / 50e9)
    assert planning.communication_seconds(p, planning.ACCELERATORS["tpu_v4"]) == pytest.approx(3e9 / 300e9)
    # a strided group inside one node (tensor-parallel layouts) still uses NVLink; across nodes, the network
    q = {"collective_bytes_per_device": {}, "collective_bytes_by_group": {"4:strided:8": 1e9, "8:strided:64": 1e9}}
    assert planning.communication_seconds(q, h100) == pytest.approx(1e9 / 900e9 + 1e9 / 50e9)
    assert planning._group_info_block("replica_groups={{0,2},{1,3},{4,6},{5,7}}", 8) == (2, False, 4)
    assert planning._group_info("replica_groups=mesh['axis_0'=8,'axis_1'=8] {'axis_1'}", 64) == (8, True)
    assert planning._group_info("replica_groups=mesh['axis_0'=8,'axis_1'=8] {'axis_0'}", 64) == (8, False)
    assert planning._group_info("replica_groups=[8,8]<=[8,8]T(1,0)", 64) == (8, False)


def test_collective_parser_formats():
    hlo = "\n".join([
        "  %ag = f32[8,16]{1,0} all-gather(f32[2,16]{1,0} %p), channel_id=1, replica_groups=[2,4]<=[8], dimensions={0}",
        "  %ar.1 = (f32[4]{0}, /*index=1*/bf16[2,2]{1,0}) all-reduce(%a, %b), replica_groups={{0,1},{2,3}}, to_apply=%add",
        "  %rs = f32[2]{0} reduce-scatter(f32[8]{0} %g), replica_groups=mesh['x'=4,'y'=2] {'x'}, dimensions={0}",
        "  %ags = (bf16[1,4]{1,0}, bf16[4,4]{1,0}) all-gather-start(bf16[1,4]{1,0} %q), replica_groups=[1,4]<=[4]",
        "  %agd = bf16[4,4]{1,0} all-gather-done(%ags)",
        "  %x = f32[2]{0} add(%y, %z)",
    ])
    got = planning.collective_bytes(hlo, 8)
    assert got["all-gather"] == pytest.approx(8 * 16 * 4 * 3 / 4 + 4 * 4 * 2 * 3 / 4)
    assert got["all-reduce"] == pytest.approx((4 * 4 + 4 * 2) * 2 * 1 / 2)
    assert got["reduce-scatter"] == pytest.approx(2 * 4 * 3)


def test_parse_mesh_and_accelerators():
    assert planning.parse_mesh("data=2,fsdp=4") == {"data": 2, "fsdp": 4, "tensor": 1}
    for bad in ("data=2,pipeline=2", "data", "fsdp=-1", "data=x"):
        with pytest.raises(ValueError, match="mesh"):
            planning.parse_mesh(bad)
    with pytest.raises(ValueError, match="unknown accelerator"):
        planning.accelerator("tpu_v9")
    for acc in planning.ACCELERATORS.values():
        assert acc.peak_flops > 1e14 and acc.hbm_bytes > 1e10 and "http" in acc.source


def test_plan_cli(tmp_path):
    """`muse-jax plan` sets up the virtual devices itself and writes the JSON plan."""
    out = tmp_path / "plan.json"
    args = ["--config", "shapes", "--mesh", "data=2,fsdp=1,tensor=2", "--accelerator", "tpu_v5e",
            "--batch-size", "8", "--json", str(out), "--config.base.num_layers=1", "--config.text.trainable=False",
            "--config.base.text_dim=16"]
    proc = subprocess.run([sys.executable, "-m", "muse_jax.cli", "plan", *args], capture_output=True, text=True,
                          timeout=300, env={**__import__("os").environ, "XLA_FLAGS": conftest.TEST_XLA_FLAGS})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tpu_v5e (TPU v5e" in proc.stdout and "mesh data=2,fsdp=1,tensor=2 (4 devices)" in proc.stdout
    p = json.loads(out.read_text())
    assert p["num_devices"] == 4 and p["mesh"] == {"data": 2, "fsdp": 1, "tensor": 2}
    assert math.isclose(p["flops"]["xla_total"], p["flops"]["xla_per_device"] * 4)
    bad = subprocess.run([sys.executable, "-m", "muse_jax.cli", "plan", "--config", "shapes", "--mesh", "data=3",
                          "--batch-size", "8"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "batch size 8" in bad.stderr
