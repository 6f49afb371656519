"""Analytic counts of a training step, from the configs alone (no compile): the cross-check of XLA's figures.

  - `analytic_forward_flops`, `analytic_train_flops`: matmul FLOPs of the masked transformer (forward;
    a training step's model FLOPs and those executed with remat and attention recomputation);
  - `analytic_t5_encoder_flops`, `analytic_vqgan_encoder_flops`: the frozen encoders' forward passes;
  - `analytic_activation_bytes`: the activations saved for the backward pass (by attention path);
  - `step_source` and `in_step_flops`: what the step of `muse-jax train` runs besides the transformer;
  - `compute_flops_per_device`: the FLOPs the compute time is taken from (XLA's, or the analytic
    count where XLA's cost analysis misses the blockwise attention's loops);
  - aMUSEd fine-tuning: `analytic_uvit_forward_flops`, `analytic_uvit_train_flops` (full, or LoRA with
    `lora_adapter_flops`), `analytic_uvit_activation_bytes`, and `amused_in_step_flops` (CLIP's text tower,
    `analytic_clip_text_flops`, and the VQGAN encoder, which the step runs frozen).
"""
from __future__ import annotations

from collections.abc import Mapping

from muse_jax.data import sources


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



def step_source(config) -> str:
    """What the batches of `muse-jax train` hold for `config` (training/inputs.py `build`):
    "images" (real data streamed: uint8 images and caption ids, tokenized in the step by the frozen
    VQGAN(s), with a frozen T5 there too), "tokens" (`config.data.source="tokens"`: tokens computed once,
    caption ids; a frozen T5 runs in the step) or "cache" (shapes: the token cache, and the frozen T5's
    embeddings cached once)."""
    if sources.is_shapes(config.data):
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


# ----------------------------------------------------------------------------- aMUSEd (UVit2D, CLIP text)

# The UVit2D's parts in the order the forward pass runs them (text and cond are side inputs).
UVIT_PARTS = ("text", "cond", "embed", "down", "to_hidden", "layers", "from_hidden", "up", "head")
_UVIT_MODULE_PART = {"encoder_proj": "text", "encoder_proj_layer_norm": "text", "cond_embed": "cond", "embed": "embed",
                     "down_block": "down", "project_to_hidden": "to_hidden", "project_to_hidden_norm": "to_hidden",
                     "project_from_hidden": "from_hidden", "project_from_hidden_norm": "from_hidden",
                     "up_block": "up", "mlm_layer": "head"}


def uvit_grid(c, grid: int) -> int:
    """Positions per side of the UVit2D's transformer stack on a grid x grid token grid (the 2x2
    stride-2 down-sampling pads right and bottom)."""
    return (grid - 1) // 2 + 1 if c.downsample else grid


def _uvit_parts(c, text_length: int, grid: int) -> dict[str, tuple[float, float, float]]:
    """Per example and part of the UVit2D forward (`UVIT_PARTS`): (FLOPs of matmuls with a weight,
    those of them on inputs no parameter of the blocks influences (the text's k/v projections, the cond
    vector's modulations: no input gradient when only the transformer trains), FLOPs of the attention's
    activation-by-activation products (scores, weighted sums)). 2 FLOPs per multiply-add.

    On n = grid² tokens, m positions in the U blocks and transformer (n, or a quarter with downsample),
    T text states of width D, hidden width H, block width C, feed-forward width I, token embedding
    width E, K codes, cond input P + M (pooled text, micro-conditions):
      text: encoder_proj 2·T·D·H;  cond: Linear, Linear 2·(P + M)·H + 2·H²;  embed: 1x1 conv 2·n·E·C
      U block (down and up): per residual block the 3x3 depthwise conv 18·m·C, channelwise 16·m·C² and the
        FiLM mapper 4·H·C; per attention block the kv_mapper 2·T·H·C (when H != C) and two cross-attentions
        (q, out 4·m·C², k, v 4·T·C², scores and weighted sum 4·m·T·C); down-sampling 2x2 conv 8·m·C²
        (up-sampling: the same)
      to_hidden, from_hidden: 2·m·C·H each
      transformer layer: three adaptive norms 12·H²; self-attention 8·m·H² + 4·m²·H; cross-attention
        4·m·H² + 4·T·H² + 4·m·T·H; GEGLU 6·m·H·I
      head: 2·n·C·E + 2·n·E·K
    """
    H, C, D, I, E, K = c.hidden_size, c.block_out_channels, c.encoder_hidden_size, c.intermediate_size, \
        c.in_channels, c.codebook_size
    T, n, R = text_length, grid * grid, c.num_res_blocks
    m = uvit_grid(c, grid) ** 2

    def block(resample: bool):
        kv_map = 2 * T * H * C if H != C else 0
        w = R * (18 * m * C + 16 * m * C * C + 2 * (4 * m * C * C + 4 * T * C * C)) + (8 * m * C * C if resample else 0)
        const = R * (4 * H * C + kv_map + 2 * 4 * T * C * C)
        return (float(w + R * (4 * H * C + kv_map)), float(const), float(R * 2 * 4 * m * T * C))

    L = c.num_hidden_layers
    layer_w = 12 * H * H + 8 * m * H * H + 4 * m * H * H + 4 * T * H * H + 6 * m * H * I
    return {
        "text": (2.0 * T * D * H, 2.0 * T * D * H, 0.0),
        "cond": (2.0 * (c.cond_embed_dim + c.micro_cond_embed_dim) * H + 2.0 * H * H, 0.0, 0.0),
        "embed": (2.0 * n * E * C, 0.0, 0.0),
        "down": block(c.downsample),
        "to_hidden": (2.0 * m * C * H, 0.0, 0.0),
        "layers": (float(L * layer_w), float(L * (12 * H * H + 4 * T * H * H)), float(L * (4 * m * m * H + 4 * m * T * H))),
        "from_hidden": (2.0 * m * H * C, 0.0, 0.0),
        "up": block(c.upsample),
        "head": (2.0 * n * C * E + 2.0 * n * E * K, 0.0, 0.0),
    }


def analytic_uvit_forward_flops(uvit_config, batch: int, text_length: int, grid: int) -> float:
    """Matmul and conv FLOPs (2 per multiply-add) of one forward pass of aMUSEd's UVit2D on `batch` grids of
    grid x grid tokens with `text_length` text states (`_uvit_parts`; embedding lookups are gathers)."""
    return float(batch * sum(w + a for w, _, a in _uvit_parts(uvit_config, text_length, grid).values()))


def _adapter_tokens(names: tuple[str, ...], n: int, m: int, text_length: int) -> int:
    """How many vectors per example the kernel of module path `names` (e.g. transformer_layers_0/attn2/to_k)
    multiplies in the UVit2D: the text's for k and v of a cross-attention, one for the cond vector's
    modulations, the token grid's for the embedding and head, else the m positions of the blocks."""
    top, owner = names[0], names[-1]
    cross = "attn2" in names or any(x.startswith("attention_blocks_") for x in names)
    if (owner in ("to_k", "to_v") and cross) or owner == "kv_mapper" or top == "encoder_proj":
        return text_length
    if top == "cond_embed" or owner in ("linear", "cond_embeds_mapper"):
        return 1
    return n if top in ("embed", "mlm_layer") else m


def lora_adapter_flops(adapters, uvit_config, text_length: int, grid: int) -> tuple[float, str]:
    """(forward FLOPs per example of the LoRA adapters `adapters` (a tree of A [in, r], B [r, out] leaves), the
    first of `UVIT_PARTS` holding one): qwix adds x·A·B beside each adapted kernel, 2·r·(in + out) per vector."""
    import math

    import jax

    from muse_jax.models import lora as lora_lib

    a_suffix, b_suffix = lora_lib.SUFFIXES
    leaves = {tuple(lora_lib._names(p)): x for p, x in jax.tree_util.tree_leaves_with_path(adapters)}  # noqa: SLF001
    n, m = grid * grid, uvit_grid(uvit_config, grid) ** 2
    flops, parts = 0.0, []
    for names, a in leaves.items():
        if not names[-1].endswith(a_suffix):
            continue
        b = leaves[names[:-1] + (names[-1][: -len(a_suffix)] + b_suffix,)]
        rank = a.shape[-1]
        flops += 2.0 * rank * (math.prod(a.shape[:-1]) + math.prod(b.shape) // rank) * \
            _adapter_tokens(names[:-1], n, m, text_length)
        parts.append("layers" if names[0].startswith("transformer_layers_") else _UVIT_MODULE_PART.get(names[0], "text"))
    return flops, min(parts, key=UVIT_PARTS.index) if parts else "head"


def analytic_uvit_train_flops(uvit_config, batch: int, text_length: int, grid: int, remat: bool | None = None,
                              lora: tuple[float, str] | None = None) -> dict[str, float]:
    """Model FLOPs of a UVit2D training step and those executed with remat (one more forward of the
    transformer layers). Full fine-tuning: 3x forward (forward, gradients of activations and of weights)
    less the input gradients of the text and cond projections (their inputs are data). LoRA (`lora` =
    `lora_adapter_flops`): the forward with the adapters, the activation gradients from the loss back to
    the first adapted part (1x a weight matmul, 2x an attention product; none into the text's k/v or the
    cond vector's modulations) and the adapters' gradients (2x their forward); no weight gradient of
    the frozen kernels."""
    c = uvit_config
    remat = c.remat if remat is None else remat
    parts = _uvit_parts(c, text_length, grid)
    fwd = sum(w + a for w, _, a in parts.values())
    if lora is None:
        adapters, model = 0.0, 3 * fwd - parts["text"][0] - 2 * (c.cond_embed_dim + c.micro_cond_embed_dim) * \
            c.hidden_size
    else:
        adapters, first = lora
        trained = UVIT_PARTS[UVIT_PARTS.index(first):]
        fwd += adapters
        model = fwd + sum(w - const + 2 * a for p, (w, const, a) in parts.items() if p in trained) + 2 * adapters
    executed = model
    if remat:
        w, _, a = parts["layers"]
        executed += w + a + (adapters if lora is not None else 0.0)
    return {"forward": float(batch * fwd), "model": float(batch * model), "executed": float(batch * executed)}


def analytic_uvit_activation_bytes(uvit_config, batch: int, text_length: int, grid: int, remat: bool | None = None,
                                   first_trained: str = "text") -> float:
    """Activations the UVit2D keeps for the backward pass of `batch` examples (the per-device batch), in bytes.

    In the compute dtype (s bytes), per position: a transformer layer keeps its three norms' inputs and
    outputs, q, k, v, both attention outputs and the cross-attention's q (12·H) and the GEGLU's
    projection and product (3·I); per example its cross-attention's text k, v (2·T·H); its attention
    probabilities in float32 and s (h·m·(m + T)·(4 + s)); with dropout 1-byte masks (2·H + I). A residual
    block keeps about 16·C (depthwise in and out, norm, the 4C linear, GELU and response-norm outputs),
    an attention block 8·C and 2·hb·m·T·(4 + s) probabilities, with 4·T·C text k, v per example; the
    embedding and head 4·E + 2·C per token. With `remat` a transformer layer keeps only its input (H),
    and one layer's set is live again in its backward. Parts before `first_trained` (LoRA: the first
    adapted one) keep nothing. Plus the float32 logits and their gradient (2·n·K·4 per example).
    """
    c = uvit_config
    remat = c.remat if remat is None else remat
    s = 2 if c.dtype in ("bfloat16", "float16") else 4
    H, C, I, E, K, h, hb = c.hidden_size, c.block_out_channels, c.intermediate_size, c.in_channels, \
        c.codebook_size, c.num_attention_heads, c.block_num_heads
    T, n = text_length, grid * grid
    m = uvit_grid(c, grid) ** 2
    dropout = c.hidden_dropout > 0
    layer = m * (s * (12 * H + 3 * I) + dropout * (2 * H + I)) + h * m * (m + T) * (4 + s) + 2 * T * H * s
    block = c.num_res_blocks * (m * s * (16 * C + 8 * C) + 2 * hb * m * T * (4 + s) + 4 * T * C * s)
    L = c.num_hidden_layers
    parts = {
        "embed": n * s * (2 * E + C), "down": block + (2 * n * C * s if c.downsample else 0),
        "to_hidden": m * s * (2 * C + H), "layers": L * m * H * s + layer if remat else L * layer,
        "from_hidden": m * s * (2 * H + C), "up": block + (2 * m * C * s if c.upsample else 0),
        "head": n * s * (C + 2 * E) + 2 * n * K * 4,
    }
    first = UVIT_PARTS.index(first_trained)
    return float(batch * sum(b for p, b in parts.items() if UVIT_PARTS.index(p) >= first))


def analytic_clip_text_flops(clip_config, batch: int, length: int) -> float:
    """Matmul FLOPs (2 per multiply-add) of CLIP's text tower and projection on `batch` texts of `length` ids:
    per layer of width d and MLP width f, q, k, v, out 8·L·d², scores and weighted sum 4·L²·d, MLP 4·L·d·f;
    the projection of the pooled state 2·d·p per text."""
    t = clip_config.text
    d, f, L = t.hidden_size, t.intermediate_size, length
    per_layer = 8 * L * d * d + 4 * L * L * d + 4 * L * d * f
    return float(batch * (t.num_hidden_layers * per_layer + 2 * d * clip_config.projection_dim))


def amused_in_step_flops(clip_config, vqgan_config, batch: int, text_length: int, image_size: int) -> dict[str, float]:
    """Analytic FLOPs of the frozen encoders an aMUSEd fine-tuning step runs on `batch` examples (forward
    only): CLIP's text tower on the caption ids, the VQGAN encoder on the images."""
    return {"clip_encoder": analytic_clip_text_flops(clip_config, batch, text_length),
            "vqgan_encoder": analytic_vqgan_encoder_flops(vqgan_config, batch, image_size)}
