"""The patch discriminator of the VQGAN's adversarial loss (Isola et al. 2017; Esser et al. 2021).

Images [B,H,W,3] in [-1,1] -> logits [B,H',W',1], one per overlapping patch. GroupNorm
instead of BatchNorm, so the discriminator has no batch statistics to carry.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

_CONV_AXES = (None, None, "conv_in", "conv_out")


class PatchDiscriminator(nn.Module):
    """`num_layers` stride-2 4x4 convs of doubling width (at most 8x), then two stride-1 convs."""

    channels: int = 64
    num_layers: int = 3
    norm_groups: int = 32

    def _conv(self, features, stride, name):
        return nn.Conv(
            features,
            (4, 4),
            strides=(stride, stride),
            padding=((1, 1), (1, 1)),
            kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), _CONV_AXES),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
            name=name,
        )

    def _norm(self, features, name):
        return nn.GroupNorm(
            num_groups=min(self.norm_groups, features),
            scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("conv_out",)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
            name=name,
        )

    @nn.compact
    def __call__(self, images):
        x = self._conv(self.channels, 2, "conv_0")(images.astype(jnp.float32))
        x = nn.leaky_relu(x, 0.2)
        for i in range(1, self.num_layers + 1):
            ch = self.channels * min(2**i, 8)
            stride = 2 if i < self.num_layers else 1
            x = self._conv(ch, stride, f"conv_{i}")(x)
            x = nn.leaky_relu(self._norm(ch, f"norm_{i}")(x), 0.2)
        return self._conv(1, 1, "conv_out")(x)
