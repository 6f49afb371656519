"""Analytic counts of a training step, from the configs alone (no compile): the cross-check of XLA's figures.

  - `analytic_forward_flops`, `analytic_train_flops`: matmul FLOPs of the masked transformer (forward;
    a training step's model FLOPs and those executed with remat and attention recomputation);
  - `analytic_t5_encoder_flops`, `analytic_vqgan_encoder_flops`: the frozen encoders' forward passes;
  - `analytic_activation_bytes`: the activations saved for the backward pass (by attention path);
  - `step_source` and `in_step_flops`: what the step of `muse-jax train` runs besides the transformer;
  - `compute_flops_per_device`: the FLOPs the compute time is taken from (XLA's, or the analytic
    count where XLA's cost analysis misses the blockwise attention's loops).
"""
from __future__ import annotations

from collections.abc import Mapping


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
