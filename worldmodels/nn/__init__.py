"""Equinox building blocks. Knows nothing of reinforcement learning."""

from worldmodels.nn.conv import Conv, ConvDecoder, ConvEncoder
from worldmodels.nn.layers import MLP, BlockLinear, DenseBlock, Linear, Normalize, trunc_normal_init

__all__ = ["MLP", "BlockLinear", "Conv", "ConvDecoder", "ConvEncoder", "DenseBlock", "Linear", "Normalize",
           "trunc_normal_init"]
