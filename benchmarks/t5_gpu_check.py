"""GPU check of the T5 encoder at a released size (default T5 v1.1 XXL, Muse's encoder).

Random Hugging Face weights (nothing is downloaded) -> `load_hf` -> parity with PyTorch in
float32 (no TF32) and bfloat16, then encoder throughput in bfloat16 for both.
Usage (on a GPU machine with torch, transformers, jax, flax):
  PYTHONPATH=. python benchmarks/t5_gpu_check.py [preset] [batch] [length]
"""
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU with torch
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from muse_jax.models import t5  # noqa: E402


def rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / np.abs(b).max()), float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main():
    name = sys.argv[1] if len(sys.argv) > 1 else "t5-v1_1-xxl"
    batch = int(sys.argv[2]) if len(sys.argv) > 2 else 64
    length = int(sys.argv[3]) if len(sys.argv) > 3 else 128
    out = {"preset": name, "device": str(jax.devices()[0]), "torch": torch.__version__, "jax": jax.__version__,
           "transformers": transformers.__version__, "batch": batch, "length": length}
    cfg = t5.T5Config.from_preset(name)
    hc = transformers.T5Config(
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff, num_layers=cfg.num_layers,
        num_heads=cfg.num_heads, feed_forward_proj=cfg.feed_forward_proj, dropout_rate=0.0,
        attn_implementation="eager")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    t = time.time()
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(dev):
        model = transformers.T5EncoderModel(hc).eval()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "layer_norm" in n:
                    p.add_(0.1 * torch.randn_like(p))
    out["torch_build_s"] = time.time() - t
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 32000, (8, length))
    mask = np.arange(length)[None] < rng.integers(1, length + 1, (8, 1))
    ti, tm = torch.tensor(ids, device=dev), torch.tensor(mask.astype(np.int64), device=dev)
    with torch.no_grad():
        ref32 = model(input_ids=ti, attention_mask=tm).last_hidden_state.float().cpu().numpy()

    t = time.time()
    params = t5.load_hf(model.state_dict(), cfg)
    jax.block_until_ready(params)
    out["load_hf_s"] = time.time() - t
    enc32 = t5.T5Encoder(cfg)
    with jax.default_matmul_precision("highest"):
        f32 = jax.jit(lambda p, i, m: enc32.apply({"params": p}, i, m))(params, ids, mask)
    out["f32_vs_torch_f32 (max, norm)"] = rel(f32, ref32)
    out["f32_vs_torch_f32_real_tokens"] = rel(np.asarray(f32)[mask], ref32[mask])
    del f32

    model = model.to(torch.bfloat16)
    torch.cuda.empty_cache()
    with torch.no_grad():
        ref16 = model(input_ids=ti, attention_mask=tm).last_hidden_state.float().cpu().numpy()
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    enc16 = t5.T5Encoder(t5.T5Config.from_preset(name, dtype="bfloat16", param_dtype="bfloat16"))
    apply16 = jax.jit(lambda p, i, m: enc16.apply({"params": p}, i, m))
    bf16 = apply16(params, ids, mask)
    out["bf16_vs_torch_f32"] = rel(np.asarray(bf16)[mask], ref32[mask])
    out["torch_bf16_vs_torch_f32"] = rel(ref16[mask], ref32[mask])

    # Throughput, bf16, batch x length.
    ids_b = jnp.asarray(rng.integers(0, 32000, (batch, length)), jnp.int32)
    mask_b = jnp.ones((batch, length), bool)
    apply16(params, ids_b, mask_b).block_until_ready()
    t = time.time()
    for _ in range(5):
        y = apply16(params, ids_b, mask_b)
    y.block_until_ready()
    out["jax_bf16_prompts_per_s"] = 5 * batch / (time.time() - t)
    tib, tmb = torch.tensor(np.asarray(ids_b), device=dev), torch.ones((batch, length), device=dev,
                                                                        dtype=torch.long)
    with torch.no_grad():
        model(input_ids=tib, attention_mask=tmb)
        torch.cuda.synchronize() if dev == "cuda" else None
        t = time.time()
        for _ in range(5):
            model(input_ids=tib, attention_mask=tmb)
        torch.cuda.synchronize() if dev == "cuda" else None
    out["torch_eager_bf16_prompts_per_s"] = 5 * batch / (time.time() - t)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
