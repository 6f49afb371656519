"""LoRA adapters (models/lora.py) on the UVit2D and the Muse transformer: a fresh wrap computes the plain
model, merge folds trained adapters in, gradients reach the adapters only, logical names and sharding, errors."""
import json

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _multidevice import run_with_devices

from muse_jax.models import lora, uvit
from muse_jax.models import transformer as T

R = 4
UVIT = uvit.UVit2DConfig(
    hidden_size=32, block_out_channels=24, in_channels=16, num_res_blocks=0, num_hidden_layers=2,
    num_attention_heads=4, block_num_heads=2, codebook_size=32, vocab_size=40, micro_cond_encode_dim=8,
    micro_cond_embed_dim=40, cond_embed_dim=24, encoder_hidden_size=20, intermediate_size=48,
)
UVIT_TARGETS = r".*transformer_layers_\d+/(attn\d|ff)/.*"
MUSE = dict(codebook_size=16, grid_size=4, num_layers=2, width=32, mlp_dim=64, num_heads=4, text_dim=24)
MUSE_TARGETS = r"decoder/block_\d+/(self_attention|cross_attention|mlp/wi|mlp/wo)"


class Case:
    """A plain model, its wrap, its (unboxed) parameters and fresh adapters, and a jitted forward pass."""

    def __init__(self, model, targets, inputs, apply, base):
        self.model, self.inputs, self._apply = model, inputs, apply
        self.spec = lora.LoraSpec(R, 8.0, targets)
        self.wrapped = lora.wrap(model, self.spec)
        self.base = base
        self.boxed = lora.init_adapters(self.wrapped, jax.random.key(1), *inputs.values())
        self.adapters = nn.unbox(self.boxed)
        self._forward = {w: jax.jit(lambda p, m=m: apply(m, p, inputs)) for w, m in ((True, self.wrapped), (False, model))}

    def forward(self, params, wrapped=True):
        return np.asarray(self._forward[wrapped](params))


def _uvit_case():
    rng = np.random.default_rng(0)
    b, g = 2, 8
    inputs = {"tokens": jnp.asarray(rng.integers(0, UVIT.vocab_size, (b, g * g)), jnp.int32),
              "enc": jnp.asarray(rng.normal(size=(b, 7, UVIT.encoder_hidden_size)), jnp.float32),
              "pooled": jnp.asarray(rng.normal(size=(b, UVIT.cond_embed_dim)), jnp.float32),
              "micro": jnp.asarray([[256, 256, 0, 0, 6], [512, 384, 10, 3, 5.5]], jnp.float32)}
    base = nn.unbox(jax.jit(lambda r: uvit.init_params(UVIT, r))(jax.random.key(0)))
    return Case(uvit.UVit2D(UVIT), UVIT_TARGETS, inputs, lambda m, p, x: m.apply({"params": p}, *x.values()), base)


def _muse_case():
    model = T.build(MUSE)
    rng = np.random.default_rng(0)
    inputs = {"tokens": jnp.asarray(rng.integers(0, 17, (2, 16)), jnp.int32),
              "text_emb": jnp.asarray(rng.normal(size=(2, 5, 24)), jnp.float32),
              "text_mask": jnp.asarray(np.arange(5)[None] < np.array([[3], [5]]))}
    base = nn.unbox(jax.jit(lambda r: T.init_params(model, r, inputs))(jax.random.key(0)))
    return Case(model, MUSE_TARGETS, inputs, lambda m, p, x: T.apply(m, p, x), base)


@pytest.fixture(autouse=True, scope="module")
def _float32_matmuls():
    """float32 multiplies in every comparison (on a CPU with AMX, XLA may round them to bfloat16)."""
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="module")
def uvit_case():
    return _uvit_case()


@pytest.fixture(scope="module")
def muse_case():
    return _muse_case()


def _random(adapters, seed=0, scale=0.3):
    leaves, treedef = jax.tree_util.tree_flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(treedef, [scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def test_fresh_adapters_compute_the_plain_uvit(uvit_case):
    c = uvit_case
    np.testing.assert_array_equal(c.forward(lora.combine(c.base, c.adapters)), c.forward(c.base, wrapped=False))
    assert all(not np.any(x) for p, x in jax.tree_util.tree_leaves_with_path(c.adapters) if lora.is_adapter(p)
               and str(p[-1].key).endswith("_b"))
    # H = 32, I = 48 per layer: attn1 and attn2 (q, k, v, out: H -> H each), ff proj H -> [2, I], ff out I -> H.
    h, i = UVIT.hidden_size, UVIT.intermediate_size
    assert lora.count(c.adapters) == UVIT.num_hidden_layers * R * (8 * 2 * h + (h + 2 * i) + (i + h))
    assert lora.count(lora.combine(c.base, c.adapters)) == lora.count(c.adapters)
    assert lora.describe(lora.combine(c.base, c.adapters)).startswith(f"{lora.count(c.adapters):,} adapter parameters")


def test_fresh_adapters_compute_the_plain_muse_transformer(muse_case):
    c = muse_case
    # Jitted, an adapter on the last block's mlp/wo adds a (zero) term inside the fused reduction of the final
    # LayerNorm, which XLA then sums in another order (an ulp or two); so the jitted check leaves mlp/wo out and the
    # op-by-op one (the same arithmetic for every op) covers all targets.
    no_wo = Case(c.model, r"decoder/block_\d+/(self_attention|cross_attention|mlp/wi)", c.inputs, c._apply, c.base)
    np.testing.assert_array_equal(no_wo.forward(lora.combine(c.base, no_wo.adapters)), c.forward(c.base, wrapped=False))
    eager = T.apply(c.wrapped, lora.combine(c.base, c.adapters), c.inputs)
    np.testing.assert_array_equal(np.asarray(eager), np.asarray(T.apply(c.model, c.base, c.inputs)))


@pytest.mark.parametrize("name", ["uvit_case", "muse_case"])
def test_merge_folds_trained_adapters_into_the_kernels(name, request):
    c = request.getfixturevalue(name)
    params = lora.combine(c.base, _random(c.adapters))
    adapted = c.forward(params)
    merged = lora.merge(params, c.spec)
    folded = c.forward(merged, wrapped=False)
    plain = c.forward(c.base, wrapped=False)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(c.base)
    scale = np.abs(plain).max()
    assert np.abs(adapted - plain).max() > 1e-2 * scale  # the adapters matter ...
    np.testing.assert_allclose(folded, adapted, rtol=0, atol=1e-5 * scale)  # ... and merge keeps what they do
    # numpy in, numpy out, the same numbers.
    as_numpy = lora.merge(jax.tree_util.tree_map(np.asarray, params), c.spec)
    for x, y in zip(jax.tree_util.tree_leaves(as_numpy), jax.tree_util.tree_leaves(merged)):
        assert isinstance(x, np.ndarray)
        np.testing.assert_allclose(x, np.asarray(y), rtol=1e-6, atol=1e-6)


def test_gradients_and_sgd_reach_only_the_adapters(uvit_case):
    c = uvit_case
    target = jnp.asarray(np.random.default_rng(1).integers(0, 16, c.forward(c.base, wrapped=False).shape[:2]))

    def loss(params):
        logits = c._apply(c.wrapped, params, c.inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, target).mean()

    grad_adapters = jax.jit(jax.grad(lambda a: loss(lora.combine(c.base, a))))
    g = grad_adapters(c.adapters)
    kinds = lambda tree: {k: [x for p, x in jax.tree_util.tree_leaves_with_path(tree) if p[-1].key.endswith(k)]
                          for k in lora.SUFFIXES}  # noqa: E731
    # B = 0: dL/dA = x^T dL/dy B^T vanishes, dL/dB = (x A)^T dL/dy does not.
    assert all(not np.any(x) for x in kinds(g)["_lora_a"])
    assert all(np.any(x) for x in kinds(g)["_lora_b"])

    # SGD on the whole tree with the base frozen by label: only adapters move, B first, then A.
    params = lora.combine(c.base, c.adapters)
    labels = jax.tree_util.tree_map_with_path(lambda p, _: "adapter" if lora.is_adapter(p) else "base", params)
    tx = optax.multi_transform({"adapter": optax.sgd(0.5), "base": optax.set_to_zero()}, labels)

    @jax.jit
    def step(p, s):
        updates, s = tx.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, updates), s

    state = tx.init(params)
    once, state = step(params, state)
    twice, _ = step(once, state)
    base1, ad1 = lora.split(once)
    base2, ad2 = lora.split(twice)
    for tree in (base1, base2):
        jax.tree_util.tree_map(np.testing.assert_array_equal, tree, c.base)
    assert all(np.any(x) for x in kinds(ad1)["_lora_b"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, kinds(ad1)["_lora_a"], kinds(c.adapters)["_lora_a"])
    assert all(np.any(x != y) for x, y in zip(kinds(ad2)["_lora_a"], kinds(ad1)["_lora_a"]))
    assert all(np.any(x) for x in kinds(grad_adapters(ad1))["_lora_a"])


def test_adapters_take_their_kernels_logical_axes(uvit_case, muse_case):
    for c in (uvit_case, muse_case):
        boxed_base = jax.eval_shape(lambda: c.wrapped.init(jax.random.key(0), *c.inputs.values())["params"])
        kernels, adapters = lora.split(boxed_base)
        leaves = jax.tree_util.tree_leaves_with_path(adapters, is_leaf=lambda x: isinstance(x, nn.Partitioned))
        assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for _, x in leaves)
        for path, box in leaves:
            keys = [k.key for k in path]
            kernel = kernels
            for k in (*keys[:-1], keys[-1][: -len("_lora_a")]):
                kernel = kernel[k]
            a = adapters
            for k in (*keys[:-1], keys[-1][:-1] + "a"):
                a = a[k]
            n_in = next(k for k in range(len(kernel.value.shape) + 1)
                        if int(np.prod(kernel.value.shape[:k])) == a.value.shape[0])
            want = (kernel.names[0], None) if keys[-1].endswith("_a") else (None, kernel.names[n_in])
            assert box.names == want, (keys, box.names, kernel.names)
    ad = uvit_case.boxed["transformer_layers_0"]["attn1"]
    assert ad["to_q"]["kernel_lora_a"].names == ("embed", None)
    assert ad["to_q"]["kernel_lora_b"].names == (None, "heads")
    assert ad["to_out"]["kernel_lora_a"].names == ("heads", None)
    assert ad["to_out"]["kernel_lora_b"].names == (None, "embed")
    attn = muse_case.boxed["decoder"]["block_1"]["self_attention"]
    assert attn["query_kernel_lora_a"].names == ("embed", None)
    assert attn["out_kernel_lora_b"].names == (None, "embed")
    # split / combine are inverses on boxed, abstract and plain trees.
    for tree in (boxed_base, nn.unbox(boxed_base), lora.combine(muse_case.base, muse_case.adapters)):
        assert jax.tree_util.tree_structure(lora.combine(*lora.split(tree))) == jax.tree_util.tree_structure(tree)
    assert jax.tree_util.tree_structure(lora.init_adapters(muse_case.wrapped, jax.random.key(0),
                                                           *muse_case.inputs.values(), abstract=True)) == \
        jax.tree_util.tree_structure(muse_case.boxed)


def test_dropout_needs_an_rng_unless_deterministic(muse_case):
    c = muse_case
    spec = lora.LoraSpec(R, 8.0, MUSE_TARGETS, dropout=0.5)
    params = lora.combine(c.base, _random(c.adapters))
    training = lora.wrap(c.model, spec)
    evaluated = jax.jit(lambda p: T.apply(lora.wrap(c.model, spec, deterministic=True), p, c.inputs))(params)
    np.testing.assert_allclose(evaluated, c.forward(params), rtol=0, atol=1e-5 * np.abs(evaluated).max())
    dropped = jax.jit(lambda p, r: T.apply(training, p, c.inputs, rngs={"dropout": r}))(params, jax.random.key(3))
    assert np.abs(np.asarray(dropped - evaluated)).max() > 1e-2 * np.abs(evaluated).max()
    with pytest.raises(flax.errors.InvalidRngError, match="dropout"):
        jax.jit(lambda p: T.apply(training, p, c.inputs))(params)


SHARDED = """
import flax.linen as nn
import jax
import numpy as np
from muse_jax.models import uvit
from muse_jax.models import lora
from muse_jax import partitioning

cfg = uvit.UVit2DConfig(hidden_size=32, block_out_channels=24, in_channels=16, num_res_blocks=0,
                        num_hidden_layers=2, num_attention_heads=4, block_num_heads=2, codebook_size=32,
                        vocab_size=40, micro_cond_encode_dim=8, micro_cond_embed_dim=40, cond_embed_dim=24,
                        encoder_hidden_size=16, intermediate_size=48)
spec = lora.LoraSpec(4, 8.0, r".*transformer_layers_\\d+/(attn\\d|ff)/.*")
model = lora.wrap(uvit.UVit2D(cfg), spec)
rng = np.random.default_rng(0)
b, g = 8, 8
x = (rng.integers(0, cfg.vocab_size, (b, g * g)).astype(np.int32),
     rng.normal(size=(b, 5, cfg.encoder_hidden_size)).astype(np.float32),
     rng.normal(size=(b, cfg.cond_embed_dim)).astype(np.float32),
     np.tile(np.array([[256, 256, 0, 0, 6]], np.float32), (b, 1)))
boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), *x)["params"])
params = jax.tree.map(lambda s: rng.normal(0, 0.2, s.shape).astype(np.float32), nn.unbox(boxed))
forward = lambda p, *x: model.apply({"params": p}, *x)
with jax.default_matmul_precision("highest"):
    ref = np.asarray(jax.jit(forward)(params, *x))
    ref_merged = jax.tree.map(np.asarray, lora.merge(params, spec))

mesh, rules = partitioning.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}), partitioning.DEFAULT_RULES
shardings = partitioning.state_shardings(boxed, mesh, rules)
_, ad_shardings = lora.split(shardings)
attn = ad_shardings["transformer_layers_0"]["attn1"]
assert attn["to_q"]["kernel_lora_a"].spec == jax.sharding.PartitionSpec("fsdp", None), attn["to_q"]["kernel_lora_a"]
assert attn["to_q"]["kernel_lora_b"].spec == jax.sharding.PartitionSpec(None, "tensor"), attn["to_q"]["kernel_lora_b"]
assert attn["to_out"]["kernel_lora_b"].spec == jax.sharding.PartitionSpec(None, "fsdp"), attn["to_out"]["kernel_lora_b"]
sharded = jax.device_put(params, shardings)
split_adapters = [k for k, v in jax.tree_util.tree_leaves_with_path(lora.split(sharded)[1])
                  if not v.sharding.is_fully_replicated]
assert len(split_adapters) >= 16, split_adapters
batch = partitioning.shard_batch(dict(enumerate(x)), mesh, rules)
base_shardings = lora.split(shardings)[0]
with partitioning.axis_rules(mesh, rules), jax.default_matmul_precision("highest"):
    out = jax.jit(forward)(sharded, *(batch[i] for i in range(4)))
    merged = jax.jit(lambda p: lora.merge(p, spec), out_shardings=base_shardings)(sharded)
err = float(np.abs(np.asarray(out) - ref).max() / np.abs(ref).max())
assert err <= 1e-5, err
q = merged["transformer_layers_0"]["attn1"]["to_q"]["kernel"]
assert q.sharding == base_shardings["transformer_layers_0"]["attn1"]["to_q"]["kernel"] and not q.sharding.is_fully_replicated
for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(ref_merged)):
    np.testing.assert_allclose(np.asarray(a), b, rtol=1e-6, atol=1e-6)
print(f"OK {len(split_adapters)} split adapters, max relative error {err:.1e}")
"""


def test_sharded_adapters_on_a_data_fsdp_tensor_mesh():
    out = run_with_devices(SHARDED, n=8)
    print(out)
    assert "OK" in out


def test_spec_from_config_and_errors(uvit_case):
    import ml_collections

    config = ml_collections.ConfigDict({"lora": {"rank": 8, "alpha": 16, "targets": UVIT_TARGETS, "dropout": 0.1}})
    spec = lora.LoraSpec.from_config(config)
    assert spec == lora.LoraSpec.from_config(config.lora) == lora.LoraSpec(8, 16.0, UVIT_TARGETS, 0.1)
    assert spec.scale == 2.0 and isinstance(spec.alpha, float)
    assert lora.LoraSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert lora.LoraSpec.from_config(ml_collections.ConfigDict({"lora": {"rank": 0, "alpha": 1.0}})) is None
    assert lora.LoraSpec.from_config(ml_collections.ConfigDict({"train": {}})) is None
    assert lora.LoraSpec.from_config({"lora": {"rank": 2, "alpha": 2.0, "targets": "x"}}).dropout == 0.0

    def one_line_error(fn, field):
        with pytest.raises(ValueError, match=field) as e:
            fn()
        assert "\n" not in str(e.value)
        return str(e.value)

    bad = lambda **kw: lambda: lora.LoraSpec.from_config({"lora": {"rank": 4, "alpha": 4.0, "targets": "x", **kw}})  # noqa: E731
    one_line_error(bad(rank=-1), "config.lora.rank")
    one_line_error(bad(rank=2.5), "config.lora.rank")
    one_line_error(bad(alpha=0.0), "config.lora.alpha")
    one_line_error(bad(targets="(attn"), "config.lora.targets")
    one_line_error(bad(dropout=1.0), "config.lora.dropout")
    one_line_error(lambda: lora.LoraSpec.from_config({"lora": {"rank": 4, "alpha": 4.0}}), "config.lora.targets")
    one_line_error(lambda: lora.LoraSpec.from_dict({**spec.to_dict(), "scale": 2.0}), "scale")

    c = uvit_case
    nothing = lora.wrap(c.model, lora.LoraSpec(R, 1.0, r".*transformer_layers_\d+/attention/.*"))
    msg = one_line_error(lambda: lora.init_adapters(nothing, jax.random.key(0), *c.inputs.values()), "config.lora.targets")
    listed = msg.split("look like ")[1].rstrip(", .").split(", ")
    modules = {"/".join(k.key for k in p[:-1]) for p, _ in jax.tree_util.tree_leaves_with_path(c.base)}
    assert "matches no layer of UVit2D" in msg and len(listed) > 3 and set(listed) <= modules, msg
    one_line_error(lambda: lora.adapters_only(c.base), "config.lora.targets")

    # merge refuses adapters that do not fit their kernel; combine refuses a clash.
    params = lora.combine(c.base, c.adapters)
    ff = params["transformer_layers_0"]["ff"]["out"]
    broken = lora.combine(c.base, {"transformer_layers_0": {"ff": {"out": {
        "kernel_lora_a": ff["kernel_lora_a"][:-1], "kernel_lora_b": ff["kernel_lora_b"]}}}})
    one_line_error(lambda: lora.merge(broken, c.spec), "transformer_layers_0/ff/out/kernel")
    one_line_error(lambda: lora.combine(params, c.adapters), "in both")
