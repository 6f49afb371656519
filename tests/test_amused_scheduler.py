"""The "amused" scheduler of the decode loop against diffusers' `AmusedScheduler`, step by step.

Both sides get the same logits function and the same random draws: diffusers' `torch.multinomial`,
Gumbel noise and image-to-image re-masking are replaced by the uniform numbers our loop draws
(`sampling.amused_draws`, `sampling.amused_remask_draw`), turned into samples and noise the same way.
Then the tokens after every step must be equal, for generation, inpainting and image-to-image.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from muse_jax import sampling

torch = pytest.importorskip("torch")
scheduling_amused = pytest.importorskip("diffusers.schedulers.scheduling_amused")

K, MASK, B, N = 24, 31, 3, 64


def _logits_np(tokens, table, mix):
    """Logits that depend on each token and on the whole sequence (the masked ones too)."""
    t = np.asarray(tokens)
    return (table[t] + mix[t].mean(axis=1, keepdims=True)).astype(np.float32)


def _reference(start, draws, remask, steps, first, table, mix, temperature=(2, 0), start_ratio=None):
    """diffusers' scheduler loop, with our draws in place of torch's random numbers."""
    sched = scheduling_amused.AmusedScheduler(mask_token_id=MASK)
    sched.set_timesteps(steps, temperature)
    calls = {"sample": 0, "gumbel": 0}

    def multinomial(probs, num_samples, generator=None):
        u = torch.from_numpy(draws[calls["sample"]][0].reshape(-1).copy())
        calls["sample"] += 1
        cdf = torch.cumsum(probs, dim=-1)
        return (cdf <= (u * cdf[:, -1])[:, None]).sum(-1).clamp(max=probs.shape[-1] - 1)[:, None]

    def gumbel(t, generator=None):
        u = torch.from_numpy(draws[calls["gumbel"]][1].copy())
        calls["gumbel"] += 1
        return -torch.log((-torch.log(u.clamp(1e-20))).clamp(1e-20))

    orig_multinomial, orig_rand = torch.multinomial, torch.rand
    orig_gumbel = scheduling_amused.gumbel_noise
    torch.multinomial = multinomial
    torch.rand = lambda *a, **k: torch.from_numpy(remask.copy())
    scheduling_amused.gumbel_noise = gumbel
    try:
        latents = torch.from_numpy(start.astype(np.int64))
        if first:
            latents = sched.add_noise(latents, sched.timesteps[first - 1])
            calls["sample"] = calls["gumbel"] = first
        history = []
        for i in range(first, steps):
            logits = torch.from_numpy(_logits_np(latents.numpy(), table, mix))
            kw = {} if start_ratio is None else {"starting_mask_ratio": start_ratio}
            latents = sched.step(logits, sched.timesteps[i], latents, **kw).prev_sample
            history.append(latents.numpy().copy())
    finally:
        torch.multinomial, torch.rand = orig_multinomial, orig_rand
        scheduling_amused.gumbel_noise = orig_gumbel
    return np.stack(history)


@pytest.mark.parametrize("case", ["generate", "inpaint", "img2img"])
def test_tokens_after_every_step_equal_amused_scheduler(case):
    rng = np.random.default_rng(0)
    table = rng.normal(0, 2.0, (MASK + 1, K)).astype(np.float32)
    mix = rng.normal(0, 2.0, (MASK + 1, K)).astype(np.float32)
    steps = 12
    image = rng.integers(0, K, (B, N)).astype(np.int32)
    first, start_ratio = 0, None
    if case == "generate":
        start = np.full((B, N), MASK, np.int32)
    elif case == "inpaint":  # the same mask for every example, as diffusers takes one ratio for the batch
        masked = np.zeros(N, bool)
        masked[8:40] = True
        start = np.where(masked[None], MASK, image)
        start_ratio = torch.tensor(masked.sum() * B / (B * N), dtype=torch.float32)
    else:
        first, start = 6, image  # strength 0.5
    options = sampling.DecodeOptions(num_steps=steps, scheduler="amused", choice_temperature=2.0, first_step=first)
    key = jax.random.key(3)
    draws = [tuple(np.asarray(d) for d in sampling.amused_draws(key, t, (B, N))) for t in range(steps)]
    remask = np.asarray(sampling.amused_remask_draw(key, steps, (B, N)))

    fn = lambda tokens, step: jnp.asarray(table)[tokens] + jnp.asarray(mix)[tokens].mean(axis=1, keepdims=True)  # noqa: E731
    out, history = jax.jit(lambda s: sampling.decode(fn, s, key, mask_token_id=MASK, options=options,
                                                     return_intermediates=True))(start)
    expected = _reference(start, draws, remask, steps, first, table, mix, start_ratio=start_ratio)
    got = np.asarray(history)[first:]
    masked_counts = (expected == MASK).sum(-1)
    assert masked_counts[0].min() > 0 and masked_counts[-1].max() == 0  # the schedule did unmask over steps
    for t in range(len(expected)):
        np.testing.assert_array_equal(got[t], expected[t], err_msg=f"step {first + t}")
    np.testing.assert_array_equal(np.asarray(out), expected[-1])
    if case == "inpaint":  # the given tokens are kept
        np.testing.assert_array_equal(np.asarray(out)[start != MASK], start[start != MASK])


def test_amused_options_are_checked():
    with pytest.raises(ValueError, match="scheduler"):
        sampling.DecodeOptions(scheduler="ddim")
    with pytest.raises(ValueError, match="first_step"):
        sampling.DecodeOptions(first_step=2)  # muse scheduler
    with pytest.raises(ValueError, match="first_step"):
        sampling.DecodeOptions(num_steps=4, first_step=4, scheduler="amused")
