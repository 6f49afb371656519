"""A pretrained, frozen T5 encoder as the `text` section: `get_config("t5-v1_1-xxl")` etc.

Muse conditions on T5-XXL (4096-wide embeddings). Presets: see `muse_jax.models.t5.PRESETS`
(t5-small..t5-11b, t5-v1_1-{small,base,large,xl,xxl}, flan-t5-{small,...,xxl}).
Set `checkpoint` to a Hugging Face T5 checkpoint (directory with config.json and
*.safetensors / pytorch_model*.bin, or one file) and `spm_model` to its spiece.model;
nothing is downloaded. Other configs use it as `config.text = t5.get_config(name)`.

Frozen (`trainable=False`), the encoder runs inside the sharded train step on the batch's caption
ids when the data is streamed (real data, or `config.data.source="tokens"`), its parameters
sharded over the mesh (muse_jax/training/online.py); only the shapes token cache stores the
embeddings once (muse_jax/data/text_cache.py, in `cache_dtype`).
"""
import ml_collections

from muse_jax.models.t5 import T5Config


def get_config(arg="t5-v1_1-xxl"):
    name = arg or "t5-v1_1-xxl"
    config = ml_collections.ConfigDict()
    config.encoder = T5Config.from_preset(name).to_config_dict()
    config.max_length = 128  # tokens per prompt, EOS included
    config.checkpoint = ""  # Hugging Face T5 checkpoint path (required for a pretrained encoder)
    config.spm_model = ""  # the checkpoint's sentencepiece model (spiece.model)
    config.vocab_size = config.encoder.vocab_size  # only used when training a vocabulary
    config.spm_model_type = "unigram"
    # Frozen: the encoder runs in the train step on real data (training/online.py); on shapes its
    # embeddings are cached once (data/text_cache.py).
    config.trainable = False
    config.cache_dtype = "bfloat16"  # storage of cached embeddings: float32, float16 or bfloat16
    return config
