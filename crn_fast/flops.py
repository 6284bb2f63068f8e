"""The one FLOP counter: exact multiply-add count of a CRN forward pass, x2.

Counts every 3x3 conv of every refinement module and the 1x1 head (a multiply-add is 2 FLOPs).
Layer norm, leaky ReLU, upsampling and the pyramid are O(elements) and left out, as is usual;
they are < 0.1% of the total. 1024p at 1024x2048 = 3.161 TFLOP, 256p at 256x512 = 2.150 TFLOP.
"""
from __future__ import annotations

from .config import CRNConfig


def crn_flops(config: CRNConfig, height: int, width: int, batch: int = 1) -> int:
    config.validate_input_size(height, width)
    total, n = 0, config.num_modules
    for i, w in enumerate(config.widths):
        h_i, w_i = height >> (n - 1 - i), width >> (n - 1 - i)
        total += 2 * 9 * h_i * w_i * (config.in_channels(i) * w + w * w)
    total += 2 * height * width * config.widths[-1] * 3 * config.k
    return total * batch
