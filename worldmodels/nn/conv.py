"""Convolutional encoder and decoder for square images whose side is a power of two."""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray, UInt8

from worldmodels.nn.layers import BlockLinear, DenseBlock, Linear, Norm, Normalize, trunc_normal_init


class Conv(eqx.Module):
    """'SAME' stride-1 convolution on NHWC arrays."""

    kernel: Float[Array, "k k cin cout"]
    bias: Float[Array, " cout"]

    def __init__(self, cin: int, cout: int, size: int, *, key: PRNGKeyArray):
        self.kernel = trunc_normal_init(key, (size, size, cin, cout), size * size * cin)
        self.bias = jnp.zeros((cout,))

    def __call__(self, x: Float[Array, "n h w cin"]) -> Float[Array, "n h w cout"]:
        y = jax.lax.conv_general_dilated(x, self.kernel.astype(x.dtype), (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + self.bias.astype(x.dtype)


def _stages(resolution: int, min_resolution: int) -> int:
    if resolution < min_resolution or resolution & (resolution - 1):
        raise ValueError(f"image side {resolution} must be a power of two >= {min_resolution}")
    return int(math.log2(resolution // min_resolution))


def _upsample(x: Float[Array, "n h w c"]) -> Float[Array, "n 2h 2w c"]:
    """Nearest-neighbour 2x upsampling."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class ConvEncoder(eqx.Module):
    """uint8 images `[..., H, W, C]` -> flat features `[..., D]`.

    Each stage: conv (kernel 5, stride 1) -> 2x2 max-pool -> norm -> SiLU, channels `depth * mults`,
    until the side is `min_resolution` (64x64 -> 4x4 with four stages), as in DreamerV3 (2024).
    Pixels enter as image / 255 - 0.5.
    """

    convs: tuple[Conv, ...]
    norms: tuple[Normalize, ...]
    resolution: int = eqx.field(static=True)
    out_dim: int = eqx.field(static=True)

    def __init__(self, resolution: int, channels: int, depth: int, *, key: PRNGKeyArray,
                 mults: tuple[int, ...] = (2, 3, 4, 4), kernel: int = 5, min_resolution: int = 4,
                 norm: Norm = "rms"):
        stages = _stages(resolution, min_resolution)
        widths = [depth * mults[min(i, len(mults) - 1)] for i in range(stages)]
        keys = jax.random.split(key, stages)
        dims = [channels] + widths
        self.convs = tuple(Conv(dims[i], dims[i + 1], kernel, key=keys[i]) for i in range(stages))
        self.norms = tuple(Normalize(w, norm) for w in widths)
        self.resolution = resolution
        self.out_dim = min_resolution * min_resolution * widths[-1]

    def __call__(self, image: UInt8[Array, "... h w c"], dtype: str = "float32") -> Float[Array, "... d"]:
        """Features in `dtype` (the layers compute in it)."""
        batch = image.shape[:-3]
        x = (image.reshape(-1, *image.shape[-3:]).astype(jnp.float32) / 255.0 - 0.5).astype(dtype)
        for conv, norm in zip(self.convs, self.norms):
            x = jax.lax.reduce_window(conv(x), -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
            x = jax.nn.silu(norm(x))
        return x.reshape(*batch, -1)


class ConvDecoder(eqx.Module):
    """Features `[..., D]` -> images `[..., H, W, C]` in [0, 1] (target: image / 255), as in DreamerV3
    (2024): the features become a `min_resolution` grid of `depth * mults[-1]` channels, then norm ->
    SiLU; then per stage nearest 2x upsampling -> conv -> norm -> SiLU, channels `depth * mults` in
    reverse; a last upsampling and conv to the image channels, then a sigmoid.

    The grid: with `blocks` > 0 (the reference's default, 8), the first `deter_dim` features (the
    deterministic state) pass through block-diagonal weights, block g making channels
    [g * c / blocks, (g + 1) * c / blocks) of every grid position, plus the rest (the stochastic
    latent) through Linear(`hidden`) -> norm -> SiLU -> Linear: ~2/5 of a dense map's parameters
    (16.8M instead of 41.9M at size200m). With `blocks` = 0, one dense Linear reads all the features
    (2023, R2I).
    """

    grid_dense: Linear | None
    grid_from_deter: BlockLinear | None
    stoch_hidden: DenseBlock | None
    grid_from_stoch: Linear | None
    grid_norm: Normalize
    convs: tuple[Conv, ...]
    norms: tuple[Normalize, ...]
    out: Conv
    min_resolution: int = eqx.field(static=True)
    channels: int = eqx.field(static=True)

    def __init__(self, din: int, resolution: int, channels: int, depth: int, *, key: PRNGKeyArray,
                 mults: tuple[int, ...] = (2, 3, 4, 4), kernel: int = 5, min_resolution: int = 4,
                 norm: Norm = "rms", blocks: int = 0, deter_dim: int = 0, hidden: int = 0):
        stages = _stages(resolution, min_resolution)
        if stages < 1:
            raise ValueError(f"image side {resolution} must be at least {2 * min_resolution} to decode")
        # the encoder's widths, read from the smallest grid back up; the last upsampling has no norm
        widths = [depth * mults[min(i, len(mults) - 1)] for i in range(stages)][::-1]
        keys = jax.random.split(key, stages + 3)
        grid = min_resolution * min_resolution * widths[0]
        self.grid_dense = self.grid_from_deter = self.stoch_hidden = self.grid_from_stoch = None
        if blocks:
            if not 0 < deter_dim < din or hidden < 1:
                raise ValueError(f"block decoder input needs 0 < deter_dim < din and hidden >= 1, got deter_dim "
                                 f"{deter_dim}, din {din}, hidden {hidden}")
            if deter_dim % blocks or widths[0] % blocks:
                fits = max(b for b in range(1, blocks + 1) if deter_dim % b == 0 and widths[0] % b == 0)
                raise ValueError(
                    f"the image decoder's {blocks} blocks must divide the deterministic state ({deter_dim}) and "
                    f"the {widths[0]} channels of its first grid ({resolution}x{resolution} images, depth {depth}); "
                    f"use {fits} blocks, or 0 for one dense Linear (WorldModelConfig.decoder_blocks, on the "
                    f"command line --agent.world-model.decoder-blocks {fits})")
            self.grid_from_deter = BlockLinear(deter_dim, grid, blocks, key=keys[0])
            self.stoch_hidden = DenseBlock(din - deter_dim, hidden, key=keys[1], norm=norm)
            self.grid_from_stoch = Linear(hidden, grid, key=keys[2])
        else:
            self.grid_dense = Linear(din, grid, key=keys[0])
        self.grid_norm = Normalize(widths[0], norm)
        self.convs = tuple(Conv(widths[i], widths[i + 1], kernel, key=keys[i + 3]) for i in range(stages - 1))
        self.norms = tuple(Normalize(widths[i + 1], norm) for i in range(stages - 1))
        self.out = Conv(widths[-1], channels, kernel, key=keys[-1])
        self.min_resolution = min_resolution
        self.channels = channels

    def _grid(self, feat: Float[Array, "n d"]) -> Float[Array, "n r r c"]:
        r = self.min_resolution
        if self.grid_dense is not None:
            return self.grid_dense(feat).reshape(feat.shape[0], r, r, -1)
        blocks, deter_dim = self.grid_from_deter.blocks, self.grid_from_deter.din
        from_deter = self.grid_from_deter(feat[:, :deter_dim]).reshape(feat.shape[0], blocks, r, r, -1)
        from_deter = jnp.moveaxis(from_deter, 1, 3).reshape(feat.shape[0], r, r, -1)  # channels (block, c)
        from_stoch = self.grid_from_stoch(self.stoch_hidden(feat[:, deter_dim:]))
        return from_deter + from_stoch.reshape(feat.shape[0], r, r, -1)

    def __call__(self, feat: Float[Array, "... d"]) -> Float[Array, "... h w c"]:
        batch = feat.shape[:-1]
        x = jax.nn.silu(self.grid_norm(self._grid(feat.reshape(-1, feat.shape[-1]))))
        for conv, norm in zip(self.convs, self.norms):
            x = _upsample(x)
            x = jax.nn.silu(norm(conv(x)))
        x = jax.nn.sigmoid(self.out(_upsample(x)))
        return x.reshape(*batch, *x.shape[1:])
