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


# A base stage that streams images (data.name other than "shapes"): the shared 32 px f4 VQGAN tokenizes them
# in the step and a frozen 4-layer T5 encodes the captions there; the same config on the shapes token
# cache reads cached embeddings instead.
STREAMING = [
    "--config.base.num_layers=2", "--config.base.width=128", "--config.base.mlp_dim=512", "--config.base.num_heads=4",
    "--config.base.codebook_size=256", "--config.vqgan.codebook_size=256", "--config.base.text_dim=64",
    "--config.text.trainable=False", "--config.text.max_length=16", "--config.train.batch_size=16",
    "--config.text.encoder.vocab_size=96", "--config.text.encoder.d_model=64", "--config.text.encoder.d_kv=16",
    "--config.text.encoder.num_heads=4", "--config.text.encoder.d_ff=512", "--config.text.encoder.num_layers=4",
]


@pytest.fixture(scope="module")
def frozen_plans():
    """Plans of the streaming config on 1 device and FSDP over 4, and of the cached one on 1 device."""
    code = f"""
import json
from muse_jax import config as config_lib, planning
stream = config_lib.load_config("shapes", {STREAMING!r} + ["--config.data.name=image_text"])
cached = config_lib.load_config("shapes", {STREAMING!r})
out = {{"stream": planning.plan(stream, "data=1", ("tpu_v4",)), "cached": planning.plan(cached, "data=1", ("tpu_v4",)),
        "stream_fsdp": planning.plan(stream, "fsdp=4", ("tpu_v4",))}}
out["report"] = planning.format_plan(out["stream_fsdp"])
print("PLANS" + json.dumps(out))
"""
    stdout = run_with_devices(code, n=4, timeout=600)
    line = [l for l in stdout.splitlines() if l.startswith("PLANS")][-1]
    return json.loads(line[len("PLANS"):])


def test_streaming_step_runs_the_frozen_encoders_and_their_flops_match(frozen_plans):
    stream, cached = frozen_plans["stream"], frozen_plans["cached"]
    assert stream["config"]["step_source"] == "images" and stream["config"]["image_size"] == 32
    assert cached["config"]["step_source"] == "cache" and cached["config"]["frozen_params"] == 0
    f, c = stream["flops"], cached["flops"]
    assert c["analytic_t5_encoder"] == c["analytic_vqgan_encoder"] == 0 and c["analytic_step"] == c["analytic_model"]
    # the same transformer; the streaming step adds the T5 and VQGAN forward passes
    assert f["analytic_model"] == c["analytic_model"]
    frozen = f["analytic_t5_encoder"] + f["analytic_vqgan_encoder"]
    assert f["analytic_t5_encoder"] > 0.2 * frozen and f["analytic_vqgan_encoder"] > 0.2 * frozen
    assert frozen > 0.1 * f["analytic_model"]
    assert f["analytic_step"] == f["analytic_model"] + frozen  # no remat
    assert f["xla_per_device"] == pytest.approx(f["analytic_step"], rel=0.05)
    assert f["xla_per_device"] - c["xla_per_device"] == pytest.approx(frozen, rel=0.05)
    # the compute time counts them; MFU counts the transformer's model FLOPs only
    e = stream["estimates"]["tpu_v4"]
    assert e["step_time_s"]["compute"] == pytest.approx(f["xla_per_device"] / planning.ACCELERATORS["tpu_v4"].peak_flops)
    assert e["step_time_s"]["compute"] > cached["estimates"]["tpu_v4"]["step_time_s"]["compute"] * (1 + 0.9 * frozen / c["xla_per_device"])
    fsdp = frozen_plans["stream_fsdp"]["flops"]
    assert fsdp["xla_per_device"] == pytest.approx(f["xla_per_device"] / 4, rel=0.05)


def _t5_params(d, h, k, f, layers, vocab, buckets=32):
    """Parameters of a gated T5 encoder, by hand: embedding, relative position table, per layer two norms,
    q/k/v/out and wi_0/wi_1/wo, the final norm."""
    return vocab * d + buckets * h + layers * (2 * d + 4 * d * h * k + 3 * d * f) + d


def test_memory_per_device_includes_the_frozen_parameter_shards(frozen_plans):
    import flax.linen as nn
    import jax

    from muse_jax import config as config_lib
    from muse_jax.models import vqgan
    from muse_jax.training import online

    cfg = config_lib.load_config("shapes", STREAMING)
    vcfg = online.stage_vqgan_config(cfg, "base")
    tok = jax.eval_shape(lambda: nn.unbox(vqgan.init_params(vcfg, jax.random.key(0), 32)))
    codebook = vcfg.codebook_size * vcfg.code_dim
    # what `encode` reads: the encoder and the codebook (the decoder is not placed)
    n_vqgan = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tok["encoder"])) + codebook
    n_t5 = _t5_params(d=64, h=4, k=16, f=512, layers=4, vocab=96)
    stream, cached = frozen_plans["stream"], frozen_plans["cached"]
    assert stream["config"]["frozen_params"] == n_t5 + n_vqgan
    one, fsdp = stream["memory_per_device"], frozen_plans["stream_fsdp"]["memory_per_device"]
    assert one["frozen_params"] == 4 * (n_t5 + n_vqgan)  # float32, whole on one device
    # FSDP shards what has an `embed` axis: all of T5 but its relative position table, and the VQGAN's codebook
    relpos = 32 * 4
    assert fsdp["frozen_params"] == 4 * ((n_t5 - relpos + codebook) / 4 + relpos + n_vqgan - codebook)
    # the plan's memory: the frozen shards beside the state, and in what must fit
    assert one["arguments"] >= one["params"] + one["optimizer_state"] + one["frozen_params"]
    assert one["state_grads_activations"] - cached["memory_per_device"]["state_grads_activations"] == one["frozen_params"]
    report = frozen_plans["report"]
    assert "frozen in the step: T5 encoder, VQGAN encoder(s)" in report
    assert "frozen parameters (T5 encoder, VQGAN encoder(s); " in report and "state + grads + activations + frozen" in report


def test_frozen_encoder_flops_by_hand():
    """A 2-layer T5 (d=4, 3 heads of 2, d_ff=5, 7 ids) and an f2 VQGAN on 4 px images: every matmul and conv."""
    t5 = types.SimpleNamespace(d_model=4, d_kv=2, num_heads=3, d_ff=5, num_layers=2, feed_forward_proj="gated-gelu")
    L, d, hk, f = 7, 4, 6, 5
    attention = 3 * (2 * L * d * hk) + 2 * (2 * L * L * hk) + 2 * L * hk * d  # q, k, v; scores, weighted sum; out
    mlp = 2 * (2 * L * d * f) + 2 * L * f * d  # wi_0, wi_1; wo
    assert planning.analytic_t5_encoder_flops(t5, 3, L) == 3 * 2 * (attention + mlp)
    relu = types.SimpleNamespace(**dict(vars(t5), feed_forward_proj="relu"))
    assert planning.analytic_t5_encoder_flops(relu, 3, L) == 3 * 2 * (attention + mlp - 2 * L * d * f)

    vq = types.SimpleNamespace(channels=(2, 4), num_res_blocks=1, latent_channels=3, code_dim=3, codebook_size=5,
                               in_channels=3, downsample="conv", mid_attention=False, quant_conv=False)
    # kernel taps on the image per side: 3x3 "SAME" on 4 px: 3·4 - 2 = 10, on 2 px: 4; the stride-2 conv on
    # 4 px padded to 5: 2 outputs x 3 taps, less the one on the padding: 5
    conv_in = 2 * 3 * 2 * 10**2
    level0 = 2 * (2 * 2 * 2 * 10**2)  # residual block 2 -> 2 at 4 px: two 3x3 convs
    down = 2 * 2 * 2 * 5**2
    level1 = 2 * 2 * 4 * 4**2 + 2 * 4 * 4 * 4**2 + 2 * 2 * 4 * 2**2  # 2 -> 4 at 2 px, 4 -> 4, 1x1 shortcut
    mid = 2 * 2 * (2 * 4 * 4 * 4**2)  # two residual blocks 4 -> 4
    conv_out = 2 * 4 * 3 * 4**2
    nearest = 2 * 4 * 5 * 3  # 4 latents x 5 codes x 3 dims
    total = conv_in + level0 + down + level1 + mid + conv_out + nearest
    assert planning.analytic_vqgan_encoder_flops(vq, 2, 4) == 2 * total
    # avgpool downsampling (no FLOPs), attention in the middle (4 positions, width 4), a 1x1 quant_conv 3 -> 2
    other = types.SimpleNamespace(**dict(vars(vq), downsample="avgpool", mid_attention=True, quant_conv=True, code_dim=2))
    attn = 4 * (2 * 4 * 4 * 4) + 2 * (2 * 4 * 4 * 4)  # q, k, v, out; scores, weighted sum
    changed = total - down + attn + 2 * 3 * 2 * 2**2 - nearest + 2 * 4 * 5 * 2
    assert planning.analytic_vqgan_encoder_flops(other, 2, 4) == 2 * changed


def test_frozen_encoder_flops_match_xla_and_the_stages_they_run_for():
    """The analytic counts against XLA's cost analysis of the modules (elementwise work adds a few %), and
    which encoders each stage's step runs: super-res tokenizes with its own tokenizer and the base's."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from muse_jax import config as config_lib
    from muse_jax.models import t5, vqgan
    from muse_jax.training import online

    def xla_flops(fn, *args):
        cost = jax.jit(fn).lower(*args).compile().cost_analysis()
        return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]

    cfg = config_lib.load_config("smoke", ["--config.text.trainable=False", "--config.text.max_length=16"])
    tcfg = t5.T5Config.coerce(cfg.text.encoder)
    module = t5.T5Encoder(tcfg)
    params = jax.eval_shape(lambda: nn.unbox(module.init(jax.random.key(0), jnp.ones((1, 16), jnp.int32))["params"]))
    ids = jax.ShapeDtypeStruct((2, 16), jnp.int32)
    got = xla_flops(lambda p, i: module.apply({"params": p}, i), params, ids)
    assert got == pytest.approx(planning.analytic_t5_encoder_flops(tcfg, 2, 16), rel=0.05)
    sizes = {}
    for stage in ("base", "superres"):
        vcfg = online.stage_vqgan_config(cfg, stage)
        px = sizes[stage] = int(cfg[stage].grid_size) * vcfg.factor
        vparams = jax.eval_shape(lambda c=vcfg, s=px: nn.unbox(vqgan.init_params(c, jax.random.key(0), s)))
        images = jax.ShapeDtypeStruct((2, px, px, 3), jnp.uint8)
        got = xla_flops(lambda p, x, c=vcfg: vqgan.VQGAN(c).apply({"params": p}, x, method=vqgan.VQGAN.encode),
                        vparams, images)
        assert got == pytest.approx(planning.analytic_vqgan_encoder_flops(vcfg, 2, px), rel=0.05)
    assert sizes == {"base": 64, "superres": 128}

    vq = {s: planning.analytic_vqgan_encoder_flops(online.stage_vqgan_config(cfg, s), 8, sizes[s]) for s in sizes}
    text = planning.analytic_t5_encoder_flops(tcfg, 8, 16)
    assert planning.in_step_flops(cfg, "base", 8, 16) == {"t5_encoder": text, "vqgan_encoder": vq["base"]}
    assert planning.in_step_flops(cfg, "superres", 8, 16) == {"t5_encoder": text,
                                                              "vqgan_encoder": vq["base"] + vq["superres"]}
    with cfg.unlocked():
        cfg.data.source = "tokens"  # tokens computed once: only the frozen T5 runs in the step
    assert planning.in_step_flops(cfg, "superres", 8, 16) == {"t5_encoder": text, "vqgan_encoder": 0.0}
    with cfg.unlocked():
        cfg.text.trainable = True
    assert planning.in_step_flops(cfg, "base", 8, 16) == {"t5_encoder": 0.0, "vqgan_encoder": 0.0}
    assert planning.in_step_flops(config_lib.load_config("shapes", ["--config.text.trainable=False"]), "base", 8, 16) == \
        {"t5_encoder": 0.0, "vqgan_encoder": 0.0}  # the shapes cache: tokens and embeddings cached


# aMUSEd fine-tuning (configs/amused_finetune.py) planned from its architecture presets, shrunk: a 2-layer UVit2D
# (hidden 64, one residual and attention block of width 32 around it), a 1-layer CLIP text tower on 16 ids, an f4
# VQGAN on 16 px images (4 x 4 tokens), LoRA rank 4.
AMUSED_TINY = [
    "--config.model.uvit.hidden_size=64", "--config.model.uvit.num_attention_heads=4",
    "--config.model.uvit.num_hidden_layers=2", "--config.model.uvit.intermediate_size=128",
    "--config.model.uvit.block_out_channels=32", "--config.model.uvit.in_channels=16",
    "--config.model.uvit.num_res_blocks=1", "--config.model.uvit.block_num_heads=2",
    "--config.model.uvit.codebook_size=64", "--config.model.uvit.vocab_size=72",
    "--config.model.uvit.encoder_hidden_size=32", "--config.model.uvit.cond_embed_dim=16",
    "--config.model.uvit.micro_cond_encode_dim=8", "--config.model.uvit.micro_cond_embed_dim=40",
    "--config.model.uvit.sample_size=4",
    "--config.model.clip.hidden_size=32", "--config.model.clip.num_hidden_layers=1",
    "--config.model.clip.num_attention_heads=2", "--config.model.clip.intermediate_size=64",
    "--config.model.clip.vocab_size=100", "--config.model.clip.projection_dim=16",
    "--config.model.clip.max_position_embeddings=16", "--config.text.max_length=16",
    "--config.model.vqgan.channels=(8,16,16)", "--config.model.vqgan.num_res_blocks=1",
    "--config.model.vqgan.latent_channels=8", "--config.model.vqgan.code_dim=8",
    "--config.model.vqgan.codebook_size=64", "--config.model.vqgan.norm_groups=8",
    "--config.data.image_size=16", "--config.train.batch_size=4",
]
LORA_RANK = ["--config.lora.rank=4"]


@pytest.fixture(scope="module")
def amused_plans(tmp_path_factory):
    """Tiny aMUSEd fine-tunes on one device: full (float32; bfloat16 parameters and Adam state; remat) and LoRA;
    LoRA on FSDP over 2 through `muse-jax plan` (its printed plan and JSON)."""
    out = tmp_path_factory.mktemp("amused_plan") / "lora_fsdp.json"
    code = f"""
import json
from muse_jax import cli, config as config_lib, planning
full = config_lib.load_config("amused_256_finetune", {AMUSED_TINY!r})
lora = config_lib.load_config("amused_256_lora", {AMUSED_TINY + LORA_RANK!r})
bf16 = config_lib.load_config("amused_256_finetune", {AMUSED_TINY!r} + ["--config.train.param_dtype=bfloat16"])
out = {{"full": planning.plan(full, "data=1", ("h100",)), "lora": planning.plan(lora, "data=1", ("h100",)),
        "bf16": planning.plan(bf16, "data=1", ("h100",)), "remat": planning.plan(full, "data=1", ("h100",), remat=True)}}
assert cli.main(["plan", "--config", "amused_256_lora", "--mesh", "fsdp=2", "--accelerator", "tpu_v5e",
                 "--json", {str(out)!r}, *{AMUSED_TINY + LORA_RANK!r}]) == 0
print("PLANS" + json.dumps(out))
"""
    stdout = run_with_devices(code, n=2, timeout=600)
    line = [l for l in stdout.splitlines() if l.startswith("PLANS")][-1]
    plans = json.loads(line[len("PLANS"):])
    plans["lora_fsdp"] = json.loads(out.read_text())
    plans["report"] = stdout[: stdout.index("PLANS")]
    return plans


def _amused_sizes(overrides=AMUSED_TINY):
    """Parameter counts of the presets as `overrides` shrink them, from the modules themselves: the UVit2D, the
    CLIP text tower with its projection, and what `VQGAN.encode` reads (all but the decoder side)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from muse_jax import config as config_lib
    from muse_jax.models import clip, uvit, vqgan

    cfg = config_lib.load_config("amused_256_finetune", overrides)
    ucfg, ccfg, vcfg = planning.amused_configs(cfg)
    size = lambda tree: sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))  # noqa: E731
    ids = jnp.zeros((1, int(cfg.text.max_length)), jnp.int32)
    n_clip = size(jax.eval_shape(lambda: clip.CLIPTextWithProjection(ccfg).init(jax.random.key(0), ids)["params"]))
    vq = jax.eval_shape(lambda: nn.unbox(vqgan.init_params(vcfg, jax.random.key(0), int(cfg.data.image_size))))
    n_vq = size(vq) - size(vq["decoder"]) - size(vq["post_quant_conv"])
    return cfg, uvit.num_params(ucfg), n_clip, n_vq


def test_amused_presets_are_the_published_architectures():
    """configs/amused_finetune.py: amused-256 (the test fixture's sizes), amused-512 (the same with the 2x2
    down/up-sampling, 32 x 32 tokens), CLIP-L/14's text tower, and diffusers' VQModel of both repos."""
    import _amused_fixture as fixture

    from muse_jax import config as config_lib
    from muse_jax.models import vqgan_diffusers

    for name, size, grid, resample in (("amused_256_finetune", 256, 16, False), ("amused_512_lora", 512, 32, True)):
        cfg = config_lib.load_config(name)
        ucfg, ccfg, vcfg = planning.amused_configs(cfg)
        s = fixture.AMUSED_256
        assert (ucfg.hidden_size, ucfg.num_attention_heads, ucfg.num_hidden_layers, ucfg.intermediate_size,
                ucfg.block_out_channels, ucfg.in_channels, ucfg.num_res_blocks, ucfg.block_num_heads,
                ucfg.codebook_size, ucfg.encoder_hidden_size, ucfg.cond_embed_dim, ucfg.micro_cond_encode_dim) == \
            (s["hidden"], s["heads"], s["layers"], s["mlp"], s["channels"], s["in_channels"], s["res_blocks"],
             s["block_heads"], s["codebook"], s["text_width"], s["projection"], s["micro_dim"])
        assert (ucfg.sample_size, ucfg.downsample, ucfg.upsample, cfg.data.image_size) == (grid, resample, resample, size)
        assert (ccfg.text.hidden_size, ccfg.text.num_hidden_layers, ccfg.text.num_attention_heads,
                ccfg.text.intermediate_size, ccfg.text.max_position_embeddings, ccfg.text.vocab_size,
                ccfg.projection_dim) == (768, 12, 12, 3072, 77, 49408, 768)
        published = {"act_fn": "silu", "block_out_channels": [128, 256, 256, 512, 768], "in_channels": 3,
                     "down_block_types": ["DownEncoderBlock2D"] * 5, "up_block_types": ["UpDecoderBlock2D"] * 5,
                     "latent_channels": 64, "layers_per_block": 2, "lookup_from_codebook": True,
                     "mid_block_add_attention": False, "norm_num_groups": 32, "norm_type": "group",
                     "num_vq_embeddings": 8192, "out_channels": 3, "vq_embed_dim": None}
        assert vcfg == vqgan_diffusers.config_from_diffusers(published)
    # aMUSEd's published sizes: 603.5M (256) and 608.3M (512, the down/up-sampling convs) UVit2D parameters
    _, n256, n_clip, _ = _amused_sizes([])
    _, n512, _, _ = _amused_sizes(["--config.model.uvit.downsample=True", "--config.model.uvit.upsample=True"])
    assert (n256, n512 - n256, n_clip) == (603_537_664, 2 * (768 + 4 * 768 * 768), 123_650_304)


def test_amused_plan_counts_what_the_step_holds(amused_plans):
    """Trained and frozen parameters, and XLA's argument bytes = parameters x 4 + Adam's mu and nu (+ its count)
    + the frozen encoders (+ LoRA's frozen UVit2D) + the batch, within a few percent."""
    cfg, n_uvit, n_clip, n_vq = _amused_sizes()
    full, lora = amused_plans["full"], amused_plans["lora"]
    B, S, L = 4, 16, 16
    batch = B * (S * S * 3 + L * 4 + L + 2 * 4 + 2 * 4 + 4)  # image, text ids and mask, micro-condition fields
    assert full["config"]["params"] == n_uvit and full["config"]["base_params"] == 0
    assert full["config"]["frozen_params"] == lora["config"]["frozen_params"] == n_clip + n_vq
    m = full["memory_per_device"]
    assert (m["params"], m["frozen_params"], m["base_params"]) == (4 * n_uvit, 4 * (n_clip + n_vq), 0)
    assert 8 * n_uvit <= m["optimizer_state"] <= 8 * n_uvit + 64
    assert m["arguments"] == pytest.approx(4 * n_uvit + 8 * n_uvit + 4 * (n_clip + n_vq) + batch, rel=0.03)
    assert m["aliased"] >= m["params"] + m["optimizer_state"] - 64  # the state is donated
    assert m["peak"] == m["arguments"] + m["outputs"] - m["aliased"] + m["temporaries"]
    # LoRA: rank-4 adapters trained, the UVit2D's weights a frozen argument of the step
    n_adapters = lora["config"]["params"]
    assert lora["config"]["base_params"] == n_uvit and lora["config"]["lora_rank"] == 4
    assert 0 < n_adapters < 0.1 * n_uvit
    m = lora["memory_per_device"]
    assert (m["params"], m["base_params"]) == (4 * n_adapters, 4 * n_uvit)
    assert m["arguments"] == pytest.approx(4 * n_adapters * 3 + 4 * n_uvit + 4 * (n_clip + n_vq) + batch, rel=0.03)
    # FSDP over 2 halves the frozen UVit2D's kernels (along `embed`), the adapters that take a kernel's `embed`
    # axis (A of q, k, v, B of out: about half of them), CLIP's kernels and the codebook (not the VQGAN's convs)
    f = amused_plans["lora_fsdp"]["memory_per_device"]
    for k, most in (("params", 0.85), ("base_params", 0.6), ("frozen_params", 0.9)):
        assert m[k] / 2 <= f[k] < most * m[k], k


def test_amused_lora_and_memory_options_shrink_the_plan(amused_plans):
    full, lora, bf16, remat = (amused_plans[k] for k in ("full", "lora", "bf16", "remat"))
    m, ml = full["memory_per_device"], lora["memory_per_device"]
    # LoRA: far fewer trained parameters; no optimizer state or gradient for the frozen weights
    assert lora["config"]["params"] < 0.1 * full["config"]["params"]
    for k in ("arguments", "peak", "state_grads_activations"):
        assert ml[k] < m[k], k
    assert ml["state_grads_activations"] < m["state_grads_activations"] - 2 * m["params"]
    # bfloat16 parameters: half the parameter and Adam bytes
    mb = bf16["memory_per_device"]
    assert bf16["config"]["param_dtype"] == bf16["config"]["optimizer_state_dtype"] == "bfloat16"
    assert mb["params"] == m["params"] // 2 and mb["optimizer_state"] <= m["optimizer_state"] // 2 + 64
    assert mb["arguments"] == pytest.approx(m["arguments"] - (m["params"] + m["optimizer_state"]) / 2, rel=0.01)
    # remat: fewer saved activations (XLA:CPU's temporaries at least do not grow); the layers run forward twice
    mr = remat["memory_per_device"]
    assert remat["config"]["remat"] and mr["activations_analytic"] < 0.8 * m["activations_analytic"]
    assert mr["temporaries"] <= m["temporaries"]
    assert remat["flops"]["xla_per_device"] > full["flops"]["xla_per_device"]
    assert remat["flops"]["analytic_executed"] > full["flops"]["analytic_executed"] == full["flops"]["analytic_model"]


def test_amused_plan_flops_and_report(amused_plans):
    """The analytic counts (UVit2D, CLIP text, VQGAN encoder) against XLA's; the printed plan names them."""
    for k in ("full", "lora"):
        f = amused_plans[k]["flops"]
        assert f["analytic_step"] == f["analytic_model"] + f["analytic_clip_encoder"] + f["analytic_vqgan_encoder"]
        # XLA also counts the elementwise work (norms, GELU, softmax, Adam), large at these widths
        assert f["analytic_step"] < f["xla_per_device"] < 1.25 * f["analytic_step"], k
    full, lora = amused_plans["full"]["flops"], amused_plans["lora"]["flops"]
    assert lora["analytic_model"] < 0.8 * full["analytic_model"]  # no weight gradients of the frozen kernels
    assert lora["analytic_clip_encoder"] == full["analytic_clip_encoder"] > 0
    fsdp = amused_plans["lora_fsdp"]
    assert fsdp["num_devices"] == 2 and fsdp["flops"]["xla_per_device"] < 0.6 * lora["xla_per_device"]
    report = amused_plans["report"]
    assert "plan: aMUSEd UVit2D fine-tune (LoRA rank 4: " in report and "mesh data=1,fsdp=2,tensor=1" in report
    assert "frozen in the step: CLIP text encoder, VQGAN encoder" in report
    assert "frozen UVit2D weights (LoRA base)" in report and "tpu_v5e (TPU v5e" in report


def test_amused_plan_refuses_what_it_cannot_plan():
    from muse_jax import config as config_lib

    cfg = config_lib.load_config("amused_256_finetune", AMUSED_TINY)
    with pytest.raises(ValueError, match="one stage"):
        planning.plan(cfg, "data=1", stage="superres")
    with pytest.raises(ValueError, match="layers-from"):
        planning.plan_extrapolated(cfg, "data=1", layers_from=(1, 2))
    bad = config_lib.load_config("amused_256_finetune", AMUSED_TINY + ["--config.data.image_size=32"])
    with pytest.raises(ValueError, match="image_size=32"):
        planning.plan(bad, "data=1")
