"""A random aMUSEd pipeline (diffusers `AmusedPipeline`, PyTorch) saved with `save_pretrained`.

Tests and benchmarks import it: the components are those of amused-256/512 at any size, with a
byte-level CLIP BPE vocabulary and a few dozen merges learned from a small caption corpus.
"""
from __future__ import annotations

import collections
import json
import pathlib

import numpy as np

CORPUS = ("a red circle", "a blue square on the left", "two green crosses", "a photo of a cat", "the sea at night",
          "an oil painting of a tree", "a small yellow triangle", "the red car")
TINY = dict(hidden=32, heads=2, layers=2, mlp=64, channels=32, in_channels=16, res_blocks=1, block_heads=2,
            codebook=32, grid=8, text_width=32, text_layers=2, text_heads=2, projection=16, micro_dim=4,
            vq_channels=(16, 32), vq_latent=8)
# amused-256's transformer, text encoder and VQGAN sizes (diffusers' configs of amused/amused-256).
AMUSED_256 = dict(hidden=1024, heads=16, layers=22, mlp=2816, channels=768, in_channels=768, res_blocks=3,
                  block_heads=12, codebook=8192, grid=16, text_width=768, text_layers=12, text_heads=12,
                  projection=768, micro_dim=256, vq_channels=(128, 256, 256, 512, 768), vq_latent=64)


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's map of the 256 bytes to printable characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    codes = printable + [256 + i for i in range(256 - len(printable))]
    others = [b for b in range(256) if b not in printable]
    return dict(zip(printable + others, (chr(c) for c in codes), strict=True))


def write_tokenizer_files(folder, num_merges: int = 40) -> dict[str, int]:
    """vocab.json + merges.txt: the byte symbols (and their end-of-word forms), merges learned greedily
    from CORPUS, then <|startoftext|>, <|endoftext|>. Returns the vocabulary."""
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars]
    words = collections.Counter(w for line in CORPUS for w in line.split())
    splits = {w: [*w[:-1], w[-1] + "</w>"] for w in words}
    merges = []
    for _ in range(num_merges):
        pairs = collections.Counter()
        for w, parts in splits.items():
            for a, b in zip(parts, parts[1:]):
                pairs[a, b] += words[w]
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merges.append(f"{a} {b}")
        vocab.append(a + b)
        for w, parts in splits.items():
            out, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            splits[w] = out
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    ids = {t: i for i, t in enumerate(vocab)}
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(ids))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return ids


def _perturb(model, torch, seed: int) -> None:
    """Non-trivial norms and biases (not 1 and 0), so that parity tests can fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias") or "gamma" in name or "beta" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def build_pipeline(sizes: dict | None = None, *, downsample: bool = False, seed: int = 0, max_length: int = 77):
    """A random `AmusedPipeline` (eval mode, float32) of `sizes` (TINY by default)."""
    import diffusers
    import torch
    import transformers

    s = dict(TINY, **(sizes or {}))
    torch.manual_seed(seed)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        vocab = write_tokenizer_files(tmp)
        tokenizer = transformers.CLIPTokenizer(f"{tmp}/vocab.json", f"{tmp}/merges.txt", model_max_length=max_length,
                                               pad_token="<|endoftext|>")
    text_encoder = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=s["text_width"], intermediate_size=4 * s["text_width"],
        num_hidden_layers=s["text_layers"], num_attention_heads=s["text_heads"], max_position_embeddings=max_length,
        projection_dim=s["projection"], hidden_act="quick_gelu", bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])).eval()
    transformer = diffusers.UVit2DModel(
        hidden_size=s["hidden"], cond_embed_dim=s["projection"], micro_cond_encode_dim=s["micro_dim"],
        micro_cond_embed_dim=5 * s["micro_dim"], encoder_hidden_size=s["text_width"],
        vocab_size=s["codebook"] + 64 if s["codebook"] > 1000 else s["codebook"] + 8, codebook_size=s["codebook"],
        in_channels=s["in_channels"], block_out_channels=s["channels"], num_res_blocks=s["res_blocks"],
        downsample=downsample, upsample=downsample, block_num_heads=s["block_heads"],
        num_hidden_layers=s["layers"], num_attention_heads=s["heads"], intermediate_size=s["mlp"],
        sample_size=s["grid"]).eval()
    levels = len(s["vq_channels"])
    vqvae = diffusers.VQModel(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=tuple(s["vq_channels"]),
        layers_per_block=1 if s["codebook"] < 1000 else 2, latent_channels=s["vq_latent"], vq_embed_dim=s["vq_latent"],
        num_vq_embeddings=s["codebook"], norm_num_groups=8 if s["codebook"] < 1000 else 32,
        mid_block_add_attention=False, lookup_from_codebook=True, force_upcast=False).eval()
    with torch.no_grad():
        vqvae.quantize.embedding.weight.normal_(0.0, 1.0)
    for i, m in enumerate((text_encoder, transformer, vqvae)):
        _perturb(m, torch, seed + i)
    scheduler = diffusers.AmusedScheduler(mask_token_id=transformer.config.vocab_size - 1)
    return diffusers.AmusedPipeline(vqvae=vqvae, tokenizer=tokenizer, text_encoder=text_encoder,
                                    transformer=transformer, scheduler=scheduler)


def write_pipeline(folder, sizes: dict | None = None, **kw):
    """`build_pipeline(...)` saved into `folder` (safetensors); returns the pipeline."""
    pipe = build_pipeline(sizes, **kw)
    pipe.save_pretrained(str(folder))
    return pipe


def image(size: int, seed: int = 0) -> np.ndarray:
    """A smooth random uint8 image [size, size, 3] (blocks of colour, so the VQGAN has structure to keep)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return np.kron(blocks, np.ones((size // 4, size // 4, 1), np.uint8))
