"""The facts every part of crn_fast shares, each stated once."""
import torch

LN_EPS = 1e-12  # TF slim.layer_norm's default epsilon
LEAKY_SLOPE = 0.2  # the authors' lrelu: max(0.2 x, x)
NUM_CLASSES = 19  # Cityscapes train ids 0..18; the generator adds a void channel (index 19)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, EXIT_VERIFY = 0, 1, 2, 3  # every crn_fast command line tool
