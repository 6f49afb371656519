"""muse_jax: Muse (masked generative transformers for text-to-image) in JAX/Flax."""
__version__ = "0.1.0"
