"""Every tile config the fused conv's GPU tuner may pick computes the same conv as its reference.

The interpreter otherwise runs one small tile, and the GPU tests the heuristic's: these are the
only checks of the other candidates' masking and indexing. On a GPU they run compiled (about 50
compiles: the GPU session runs this file last). Tolerances as in test_conv_norm.py.
"""
import importlib

import pytest
import torch

pytest.importorskip("triton")
from crn_fast import kernels as K  # noqa: E402
from test_conv_norm import DEV, inputs, ulps  # noqa: E402

pytestmark = pytest.mark.skipif(not K.can_run(torch.empty(0, device=DEV)), reason="Triton cannot run here")

_C = importlib.import_module("crn_fast.kernels.conv_norm")  # the module (K.conv_norm is its operator)
# each config in the dtype the tuner offers it for (an fp32 run of a large 16-bit tile would not
# fit an A100's shared memory)
CASES = [(c, torch.bfloat16) for c in _C.CONFIGS] + [(c, torch.float32) for c in _C.FP32_CONFIGS] \
    + [(c, dt) for c in _C.SMALL_CONFIGS for dt in (torch.bfloat16, torch.float32)] \
    + [(tuple(c), torch.bfloat16) for c in _C.TMA_CONFIGS]


@pytest.mark.parametrize("config, dtype", CASES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple)
                         else str(v).removeprefix("torch."))
def test_every_tuning_candidate_computes_the_same_conv(config, dtype):
    """The tiles the GPU tuner may pick (the interpreter otherwise runs one small tile): each, as
    conv1 (statistics), conv2 (input norm + statistics) and the head (1x1, bias, 0..255), on a
    shape that leaves every block partly masked (pixels, Cin and Cout not tile multiples) and
    with a padded pixel stride. The TMA tiles' rows are wider than the image's 30 pixels: the
    hardware fills the rest of the box with zeros and the store masks it."""
    x, wt3, norm, _ = inputs(1, 40, 72, 5, 30, 3, dtype, seed=3, pad_to=48)
    # the TMA kernel needs 8k output channels (16-byte weight rows): its head case has 16
    _, wt1, _, bias = inputs(1, 40, 16 if len(config) == 6 else 9, 5, 30, 1, dtype, seed=4)
    with K.pinned_config(config):
        for wt, nrm, b, head in ((wt3, None, None, False), (wt3, norm, None, False), (wt1, norm, bias, True)):
            y, mean, _ = K.conv_norm(x, K.pack_conv_weight(wt), b, nrm, head=head)
            ref = K.conv_norm_reference(x, wt, b, nrm, head=head)
            assert (y.float() - ref).abs().max().item() <= ulps(ref, dtype), (config, head)
            # the statistics of y as stored (rounded to its dtype), merged over the tiles
            torch.testing.assert_close(mean, y.float().mean(dim=(1, 2, 3)), atol=1e-5 * ref.abs().max().item(),
                                       rtol=1e-5)


def test_pinned_config_is_validated():
    for bad in ((100, 64, 64, 4, 3), (64, 64, 64, 4, 3, "tma"), (64, 64, 64, True, 3)):
        with pytest.raises(ValueError, match="powers of two >= 16"):
            with K.pinned_config(bad):
                pass
