"""Triton kernels for the CRN's memory-bound steps, each in one file beside its torch reference.

The kernels know nothing about CRN; the model picks an implementation with ``ops_for(backend)``.
Set TRITON_INTERPRET=1 before importing to run them on CPU tensors (how the tests run them).
"""
from types import SimpleNamespace

from ._runtime import HAS_TRITON, can_run, interpreter_enabled, memory_format_of, triton_unavailable_reason
from .area_pyramid import area_pyramid, area_pyramid_reference
from .conv_norm import (Tile, conv_norm, conv_norm_reference, pack_conv_weight, pinned_config,
                        tma_unavailable_reason, tuned_configs, unpack_conv_weight)
from .layer_norm_lrelu import (layer_norm_lrelu, layer_norm_lrelu_reference, layer_norm_stats, norm_lrelu,
                               norm_lrelu_reference)
from .upsample_concat import (norm_lrelu_upsample_concat, norm_lrelu_upsample_concat_reference, upsample_concat,
                              upsample_concat_reference)
from .upsample_conv import pack_upsample_conv_weight, upsample_conv, upsample_conv_reference

REFERENCE_OPS = SimpleNamespace(name="eager", layer_norm_lrelu=layer_norm_lrelu_reference,
                                upsample_concat=upsample_concat_reference, area_pyramid=area_pyramid_reference)
TRITON_OPS = SimpleNamespace(name="triton", layer_norm_lrelu=layer_norm_lrelu, upsample_concat=upsample_concat,
                             area_pyramid=area_pyramid)


def ops_for(backend: str) -> SimpleNamespace:
    return TRITON_OPS if backend == "triton" else REFERENCE_OPS


__all__ = ["HAS_TRITON", "can_run", "interpreter_enabled", "memory_format_of", "triton_unavailable_reason",
           "layer_norm_lrelu", "layer_norm_lrelu_reference", "layer_norm_stats", "norm_lrelu", "norm_lrelu_reference",
           "upsample_concat", "upsample_concat_reference", "norm_lrelu_upsample_concat",
           "norm_lrelu_upsample_concat_reference",
           "ops_for", "REFERENCE_OPS", "TRITON_OPS", "conv_norm", "conv_norm_reference", "pack_conv_weight",
           "unpack_conv_weight", "pinned_config", "tuned_configs", "Tile", "tma_unavailable_reason", "area_pyramid",
           "area_pyramid_reference", "upsample_conv", "upsample_conv_reference", "pack_upsample_conv_weight"]
