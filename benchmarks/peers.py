"""Times the PyTorch peers on the same two measurements as train_step.py and sample.py.

Run it through `bash benchmarks/peers.sh [flags]` (its own venv: CPU torch 2.13.0,
diffusers 0.42.1, muse-maskgit-pytorch 0.3.5), e.g.
    bash benchmarks/peers.sh --config medium
    bash benchmarks/peers.sh --config small --json
    bash benchmarks/peers.sh --config medium --compile          # + torch.compile of the faster peer
    bash benchmarks/peers.sh --config medium --only train        # or: --only decode
    bash benchmarks/peers.sh --peers lucidrains                  # or: amused
    # smoke: --depth 1 --width 64 --heads 2 --tokens 16 --codebook 64 --text-len 4 --text-width 32 \\
    #        --batch 2 --steps 3 --warmup 1 --decode-repeats 1

Peers, random weights, eager PyTorch, configured from the same model flags:
  amused      diffusers' aMUSEd `UVit2DModel`. Training step and decode are loops we write
              around the model, following diffusers' aMUSEd training script and
              `AmusedPipeline.__call__`: decode = 12 steps of `AmusedScheduler.step` (the
              peer's own sampler) with guidance as in the pipeline: one batched 2B forward,
              uncond + s (cond - uncond).
  lucidrains  muse-maskgit-pytorch's `MaskGit` over a `MaskGitTransformer`. Training step =
              `MaskGit.forward` (the peer's own masking, caption dropout and masked CE);
              decode = `MaskGit.generate` (the peer's own loop and guidance: two separate
              B-sized forwards per step, null + s (cond - null)).
Both: training step = forward + masked cross-entropy + backward + grad-norm clip 1.0 + AdamW
(b1 0.9, b2 0.96, weight decay 0.045: ours); decode = 12 steps, guidance g = 3 in our
convention ((1 + g) cond - g uncond, i.e. s = 4 in theirs), batch from --batch, tokens only
(no VQGAN decode). `--dtype bfloat16` runs under torch.autocast (float32 parameters).
`--matmul bfloat16` keeps float32 compute but lets PyTorch round float32 matmul inputs to bfloat16
(torch.backends.mkldnn.matmul.fp32_precision = "bf16"): the like-for-like row for our default.
Text embeddings are random inputs; no text encoder runs (nor in ours). FLOPs are counted
with torch.utils.flop_counter over one step (and one decode step's forwards) of the peer's
own architecture; MFU is against a 2048^3 (8192^3 on a GPU) torch matmul in the same dtype, measured in the
same run. `--compile` adds rows for the faster peer with its model under torch.compile.

Config mismatches: the MISMATCHES table below, printed after every table run and put in
each JSON row ("mismatches").
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
import traceback
import types

os.environ.setdefault("TQDM_DISABLE", "1")  # MaskGit.generate's progress bar

import common  # noqa: E402
import torch  # noqa: E402  (after TQDM_DISABLE)
import torch.nn.functional as F  # noqa: E402

GUIDANCE = 3.0  # ours: (1 + g) cond - g uncond; theirs: uncond + s (cond - uncond) with s = 1 + g
ADAMW = dict(lr=1e-4, betas=(0.9, 0.96), weight_decay=0.045)
# Every known difference between each peer, as configured here, and our model.
MISMATCHES: dict[str, list[str]] = {
    "both": [
        ("MLP: gated GELU (GEGLU, three matrices) with inner width 2/3 * mlp_ratio * width (the usual "
         "equal-FLOPs rule; aMUSEd's own 2816 for 1024 is the same), ours GELU MLP of mlp_ratio * width."),
        "no biases in attention/MLP; RMSNorm (aMUSEd) or bias-free LayerNorm (lucidrains), ours LayerNorm.",
        ('output head: a single projection to the codebook (aMUSEd: a 1x1 conv, RMSNorm, 1x1 conv); ours: '
         'Dense(width) -> GELU -> LayerNorm -> Dense(codebook).'),
        "loss without label smoothing (ours 0.1); their own mask-rate schedule (cosine; ours arccos).",
    ],
    "amused": [
        ("num_res_blocks 0 by default (--amused-res-blocks 3 for aMUSEd's released U-ViT layout): the conv res "
         'blocks and their attention are not part of the shared config.'),
        ('adaptive (AdaLN-continuous) norms conditioned on a pooled text embedding + micro-conditioning '
         "(random pooled embedding [B, text_width]; micro_conds as the pipeline's defaults)."),
        "cross-attention has no text mask (aMUSEd takes none); token embedding width = width.",
        ("decode: aMUSEd's scheduler samples with torch.multinomial and a temperature schedule (2 -> 0) on its "
         'confidences; ours inverse-CDF categorical sampling, choice temperature 4.5 -> 0.'),
    ],
    "lucidrains": [
        ('attention: l2-normalised queries and keys with learned scales (scale 8) and a learned null '
         'key/value; flash=False (plain attention: its flash path is a Python-level chunked kernel).'),
        "1-D learned position embedding; text projection is the identity when text_width == width.",
        ('caption dropout via cond_drop_prob 0.1 (the peer masks all text positions instead of swapping in an '
         'empty prompt). Parameters exclude the unused self-conditioning FeedForward.'),
        ("decode: top-k filter 0.9 (keeps the top 10 % of logits; the peer's default), Gumbel temperature 1 -> "
         '0 on the samples, confidence = 1 - p; two B-sized forwards per step.'),
        ("MaskGit's constructor needs a VQGanVAE: a tiny one is built and replaced by an identity token "
         "pass-through, so generate() returns tokens and no VQGAN decode is timed."),
    ],
}


def _stub_torchvision() -> None:
    """muse-maskgit-pytorch imports torchvision names it never calls for token-level work."""
    if "torchvision" in sys.modules:
        return

    def unavailable(*args, **kwargs):
        raise RuntimeError("torchvision is not installed in the peers' venv (see peers.sh)")

    def stub(name, **attrs):
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        sys.modules[name] = m
        return m

    tv = stub("torchvision", __version__="0+stub")
    tv.transforms = stub("torchvision.transforms")
    tv.datasets = stub("torchvision.datasets", ImageFolder=unavailable)
    tv.utils = stub("torchvision.utils", make_grid=unavailable, save_image=unavailable)


MATMUL = {"mode": "float32"}  # set by --matmul (set_matmul)


def set_matmul(mode: str) -> None:
    """--matmul bfloat16: float32 matmuls multiply bfloat16-rounded inputs (oneDNN on CPU; cuBLAS on GPU)."""
    if mode == "bfloat16":
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        torch.set_float32_matmul_precision("medium")
    MATMUL["mode"] = mode


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def sync(_=None) -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def autocast(dtype: str):
    if dtype == "bfloat16":
        return torch.autocast(device_type=device(), dtype=torch.bfloat16)
    return contextlib.nullcontext()


def count_flops(fn) -> float | None:
    """Matmul/conv/attention FLOPs of fn() by torch.utils.flop_counter (None if it fails)."""
    try:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            fn()
        return float(counter.get_total_flops())
    except Exception as e:  # best effort
        print(f"warning: FLOP counting failed: {e!r}", file=sys.stderr)
        return None


def n_params(module, exclude: tuple[str, ...] = ()) -> int:
    return sum(p.numel() for n, p in module.named_parameters() if not any(n.startswith(x) for x in exclude))


# ----------------------------------------------------------------------------- the peers


class Peer:
    """A peer model with a training step and a decode, built for a ModelShape."""

    name = ""

    def __init__(self, shape: common.ModelShape, seed: int, compiled: bool = False):
        self.shape, self.seed, self.compiled = shape, seed, compiled
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        s, dev = shape, device()
        self.tokens = torch.randint(0, s.codebook, (s.batch, s.tokens), generator=g).to(dev)
        self.text = torch.randn(s.batch, s.text_len, s.text_width, generator=g).to(dev)
        self.empty_text = torch.randn(s.text_len, s.text_width, generator=g).to(dev)

    def train_step(self) -> torch.Tensor:
        raise NotImplementedError

    def decode(self) -> torch.Tensor:
        raise NotImplementedError

    def forward_flops_per_decode_step(self) -> float | None:
        raise NotImplementedError

    def _optimizer(self, module):
        self.opt = torch.optim.AdamW(module.parameters(), **ADAMW)

    def _update(self, module, loss):
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        self.opt.step()


class Amused(Peer):
    """diffusers' UVit2DModel with our loops (training: the aMUSEd script's; decode: the pipeline's)."""

    name = "amused"

    def __init__(self, shape, seed, compiled=False, res_blocks: int = 0):
        super().__init__(shape, seed, compiled)
        from diffusers import UVit2DModel
        from diffusers.schedulers import AmusedScheduler

        s, dev = shape, device()
        self.model = UVit2DModel(
            hidden_size=s.width, use_bias=False, hidden_dropout=0.0, cond_embed_dim=s.text_width,
            micro_cond_encode_dim=256, micro_cond_embed_dim=5 * 256, encoder_hidden_size=s.text_width,
            vocab_size=s.codebook + 1, codebook_size=s.codebook, in_channels=s.width, block_out_channels=s.width,
            num_res_blocks=res_blocks, downsample=False, upsample=False, block_num_heads=s.heads,
            num_hidden_layers=s.depth, num_attention_heads=s.heads, attention_dropout=0.0,
            intermediate_size=int(2 * s.mlp_dim / 3), layer_norm_eps=1e-6, sample_size=s.grid,
        ).to(dev)
        self.params = n_params(self.model)
        self.forward = torch.compile(self.model) if compiled else self.model
        self.scheduler = AmusedScheduler(mask_token_id=s.codebook, masking_schedule="cosine")
        g = torch.Generator().manual_seed(seed + 1)
        self.pooled = torch.randn(s.batch, s.text_width, generator=g).to(dev)
        self.empty_pooled = torch.randn(s.text_width, generator=g).to(dev)
        # The pipeline's default micro-conditioning: (width, height, crop x, crop y, aesthetic 6).
        self.micro = torch.tensor([[256.0, 256.0, 0.0, 0.0, 6.0]], device=dev)
        self._optimizer(self.model)

    def _logits(self, ids, text, pooled):
        s = self.shape
        out = self.forward(ids.view(-1, s.grid, s.grid), micro_conds=self.micro.expand(ids.shape[0], -1),
                           pooled_text_emb=pooled, encoder_hidden_states=text)
        return out  # [b, K, g, g]

    def train_step(self):
        s, dev = self.shape, device()
        self.model.train()
        b = s.batch
        # Cosine mask schedule as in diffusers' aMUSEd training script; caption dropout 0.1.
        rate = torch.cos(torch.rand(b, device=dev) * math.pi / 2)
        n_mask = (s.tokens * rate).round().clamp(min=1)
        mask = torch.rand(b, s.tokens, device=dev).argsort(-1) < n_mask[:, None]
        inputs = torch.where(mask, s.codebook, self.tokens)
        labels = torch.where(mask, self.tokens, -100)
        drop = torch.rand(b, device=dev) < 0.1
        text = torch.where(drop[:, None, None], self.empty_text[None], self.text)
        pooled = torch.where(drop[:, None], self.empty_pooled[None], self.pooled)
        with autocast(s.dtype):
            logits = self._logits(inputs, text, pooled)
        loss = F.cross_entropy(logits.float().flatten(2), labels, ignore_index=-100)
        self._update(self.model, loss)
        return loss.detach()

    @torch.no_grad()
    def decode(self):
        s, dev = self.shape, device()
        self.model.eval()
        b = s.batch
        latents = torch.full((b, s.grid, s.grid), s.codebook, dtype=torch.long, device=dev)
        self.scheduler.set_timesteps(12, (2, 0), dev)
        text = torch.cat([self.empty_text[None].expand(b, -1, -1), self.text])
        pooled = torch.cat([self.empty_pooled[None].expand(b, -1), self.pooled])
        gen = torch.Generator(device=dev).manual_seed(self.seed)
        scale = 1.0 + GUIDANCE
        with autocast(s.dtype):
            for t in self.scheduler.timesteps:
                out = self._logits(torch.cat([latents] * 2), text, pooled)
                uncond, cond = out.chunk(2)
                out = uncond + scale * (cond - uncond)
                latents = self.scheduler.step(model_output=out, timestep=t, sample=latents, generator=gen).prev_sample
        return latents

    def forward_flops_per_decode_step(self):
        s = self.shape
        ids = torch.full((2 * s.batch, s.tokens), s.codebook, device=device())
        text, pooled = torch.cat([self.text] * 2), torch.cat([self.pooled] * 2)
        with torch.no_grad():
            return count_flops(lambda: self._logits(ids, text, pooled))


class Lucidrains(Peer):
    """muse-maskgit-pytorch's MaskGit: its own forward (training) and generate (decode)."""

    name = "lucidrains"

    def __init__(self, shape, seed, compiled=False):
        super().__init__(shape, seed, compiled)
        _stub_torchvision()
        import muse_maskgit_pytorch.muse_maskgit_pytorch as mm
        from muse_maskgit_pytorch import MaskGit, MaskGitTransformer, VQGanVAE

        s, dev = shape, device()
        # Its constructor asks T5 (from the hub) for the text width: give ours instead.
        mm.get_encoded_dim = lambda name: s.text_width
        transformer = MaskGitTransformer(
            num_tokens=s.codebook, seq_len=s.tokens, dim=s.width, depth=s.depth, heads=s.heads,
            dim_head=s.width // s.heads, ff_mult=s.mlp_ratio, flash=False)
        vae = VQGanVAE(dim=16, layers=1, codebook_size=s.codebook, use_vgg_and_gan=False)
        self.maskgit = MaskGit(image_size=s.grid, transformer=transformer, vae=vae, cond_drop_prob=0.1)
        grid = s.grid

        class TokensOut(torch.nn.Module):
            """Stands in for the VQGAN: generate() then returns the token grid itself."""

            def get_encoded_fmap_size(self, image_size):
                return grid

            def decode_from_ids(self, ids):
                return ids

        self.maskgit.vae = TokensOut()
        self.maskgit.cond_vae = None
        self.maskgit.to(dev)
        self.transformer = transformer
        transformer.encode_text = lambda texts: self.text[: len(texts)]  # random embeddings, no T5
        if compiled:
            transformer.forward = torch.compile(transformer.forward)
        self.params = n_params(self.maskgit, exclude=("transformer.self_cond_to_init_embed.",))
        self._optimizer(self.maskgit)

    def train_step(self):
        self.maskgit.train()
        with autocast(self.shape.dtype):
            loss = self.maskgit(self.tokens, text_embeds=self.text)
        self._update(self.maskgit, loss)
        return loss.detach()

    def decode(self):
        s = self.shape
        with autocast(s.dtype):
            return self.maskgit.generate(texts=[""] * s.batch, fmap_size=s.grid, timesteps=12,
                                         cond_scale=1.0 + GUIDANCE)

    def forward_flops_per_decode_step(self):
        s = self.shape
        ids = torch.full((s.batch, s.tokens), s.codebook, device=device())
        with torch.no_grad():
            one = count_flops(lambda: self.transformer(ids, text_embeds=self.text, cond_drop_prob=0.0))
        return None if one is None else 2 * one  # cond and null forwards


def build(name: str, shape, args, compiled=False) -> Peer:
    if name == "amused":
        return Amused(shape, args.seed, compiled, res_blocks=args.amused_res_blocks)
    return Lucidrains(shape, args.seed, compiled)


# ----------------------------------------------------------------------------- measurements


def base_row(peer: Peer, bench: str, peak: float | None, notes) -> dict:
    s = peer.shape
    return {"bench": bench, "impl": peer.name + ("+compile" if peer.compiled else ""), **s.describe(),
            "matmul": MATMUL["mode"],
            "device": device(), "platform": device(), "framework": f"torch {torch.__version__}",
            "threads": torch.get_num_threads(), "params": peer.params,
            "peak_gflops_per_s": None if peak is None else peak / 1e9,
            "peak_matmul": f"n^3 torch matmul {s.dtype}", "mismatches": notes.get(peer.name, []) + notes["both"],
            "text": "random embeddings (no text encoder)"}


def measure_train(peer: Peer, args, peak, notes) -> dict:
    s = peer.shape
    t0 = time.perf_counter()
    first = peer.train_step()  # includes torch.compile's compilation when compiled
    sync()
    compile_s = time.perf_counter() - t0
    flops = count_flops(peer.train_step)
    times = common.time_calls(peer.train_step, lambda loss: (sync(), float(loss)), args.steps, args.warmup)
    step_s = common.median(times)
    loss = float(peer.train_step())
    if not math.isfinite(loss) or not math.isfinite(float(first)):
        raise RuntimeError(f"{peer.name}: non-finite loss {loss}")
    row = base_row(peer, "train_step", peak, notes)
    row.update({
        "ms_per_step": 1e3 * step_s, "image_tokens_per_s": s.batch * s.tokens / step_s,
        "timing": common.spread(times), "steps": args.steps, "warmup": args.warmup,
        "model_gflops": None if flops is None else flops / 1e9,
        "measured_gflops": None if flops is None else flops / 1e9,
        "measured_flops_source": "torch.utils.flop_counter over one step (the peer's own architecture)",
        "ours_analytic_gflops": common.train_step_flops(s) / 1e9,
        "achieved_gflops_per_s": None if flops is None else flops / step_s / 1e9,
        "mfu": None if (flops is None or peak is None) else flops / step_s / peak,
        "compile_s": compile_s if peer.compiled else None, "first_step_s": compile_s, "loss": loss,
    })
    return row


def measure_decode(peer: Peer, args, peak, notes) -> dict:
    s = peer.shape
    t0 = time.perf_counter()
    out = peer.decode()  # warm-up (and compilation when compiled)
    sync()
    first_s = time.perf_counter() - t0
    if int(out.min()) < 0 or int(out.max()) >= s.codebook:
        raise RuntimeError(f"{peer.name}: decode left tokens outside [0, {s.codebook})")
    times = common.time_calls(peer.decode, sync, args.decode_repeats, max(0, args.decode_warmup - 1))
    batch_s = common.median(times)
    per_step = peer.forward_flops_per_decode_step()
    flops = None if per_step is None else 12 * per_step
    row = base_row(peer, "decode", peak, notes)
    row.update({
        "decode_steps": 12, "guidance": GUIDANCE, "s_per_batch": batch_s, "images_per_s": s.batch / batch_s,
        "timing": common.spread(times), "steps": args.decode_repeats, "warmup": args.decode_warmup,
        "guidance_impl": {"amused": "one batched 2B forward per step (AmusedPipeline)",
                          "lucidrains": "two B forwards per step (MaskGit.generate)"}[peer.name],
        "model_gflops": None if flops is None else flops / 1e9,
        "measured_gflops": None if flops is None else flops / 1e9,
        "measured_flops_source": "torch.utils.flop_counter over one step's forwards x 12",
        "ours_analytic_gflops": common.decode_flops(s, 12) / 1e9,
        "achieved_gflops_per_s": None if flops is None else flops / batch_s / 1e9,
        "mfu": None if (flops is None or peak is None) else flops / batch_s / peak,
        "compile_s": first_s if peer.compiled else None, "first_call_s": first_s,
    })
    return row


def failure_row(name, bench, shape, err) -> dict:
    return {"bench": bench, "impl": name, **shape.describe(), "error": f"{type(err).__name__}: {err}"}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_flags(ap)
    ap.add_argument("--peers", default="amused,lucidrains", help="comma-separated: amused, lucidrains")
    ap.add_argument("--only", choices=("train", "decode"), help="run one of the two measurements")
    ap.add_argument("--decode-repeats", type=int, default=5, help="timed decodes (median)")
    ap.add_argument("--decode-warmup", type=int, default=1, help="untimed decodes before timing")
    ap.add_argument("--compile", action="store_true", help="add torch.compile rows for the faster peer")
    ap.add_argument("--amused-res-blocks", type=int, default=0,
                    help="UVit2DModel num_res_blocks (0: transformer stack only; aMUSEd releases use 3)")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    ap.add_argument("--no-peak", action="store_true", help="skip the matmul peak (no MFU)")
    ap.add_argument("--peak-size", type=int, default=0,
                    help="n of the n^3 matmul peak (0: 2048 on CPU, 8192 on a GPU, which 2048 cannot fill)")
    args = ap.parse_args(argv)
    try:
        shape = common.shape_from_args(args)
    except ValueError as e:
        ap.error(str(e))
    names = [p.strip() for p in args.peers.split(",") if p.strip()]
    for n in names:
        if n not in ("amused", "lucidrains"):
            ap.error(f"unknown peer {n!r}: expected amused and/or lucidrains")
    warning = common.check_repetitions(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    set_matmul(args.matmul or "float32")
    notes = MISMATCHES
    peak_n = common.peak_size(args.peak_size, device())
    peak = None if args.no_peak else common.torch_matmul_peak(shape.dtype, device(), peak_n)
    benches = [("train_step", measure_train), ("decode", measure_decode)]
    if args.only:
        benches = [b for b in benches if b[0] == {"train": "train_step", "decode": "decode"}[args.only]]
    rows = []
    for bench, measure in benches:
        done = []
        for name in names:
            try:
                done.append(measure(build(name, shape, args), args, peak, notes))
            except Exception as e:  # a broken peer is reported, not fatal
                traceback.print_exc(file=sys.stderr)
                done.append(failure_row(name, bench, shape, e))
        if args.compile:
            ok = [r for r in done if "error" not in r]
            key = "ms_per_step" if bench == "train_step" else "s_per_batch"
            if ok:
                fastest = min(ok, key=lambda r: r[key])["impl"]
                try:
                    done.append(measure(build(fastest, shape, args, compiled=True), args, peak, notes))
                except Exception as e:
                    print(f"torch.compile of {fastest} failed: {type(e).__name__}: {e}", file=sys.stderr)
                    done.append(failure_row(fastest + "+compile", bench, shape, e))
        for r in done:
            if warning:
                r["warning"] = warning
        rows += done
        if not args.json:
            ok = [r for r in done if "error" not in r]
            if ok:
                common.emit(ok, False, common.columns_for(ok))
            for r in done:
                if "error" in r:
                    print(f"{r['impl']} {bench}: FAILED: {r['error']}")
            print()
    if args.json:
        common.emit(rows, True)
    else:
        print(f"device: {device()} (torch {torch.__version__}, {torch.get_num_threads()} threads); text: random "
              "embeddings; FLOPs counted by torch.utils.flop_counter on each peer's own architecture")
        for peer in names + ["both"]:
            print(f"config mismatches, {peer}:")
            for line in notes.get(peer, []):
                print(f"  - {line}")


if __name__ == "__main__":
    main()
