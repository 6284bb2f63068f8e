"""Where the triton backend's time goes at 1024x2048 (GPU): the whole generator in NCHW vs
channels_last, and the convolutions alone, per dtype. cuDNN convs with 1044 (= 1024 + 20) input
channels are much slower in NCHW than in channels_last; torch.compile switches layouts itself.

    python benchmarks/memory_format.py [--res 1024x2048] [--preset 1024p]
"""
import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import time_fn  # noqa: E402

from crn_fast import CRN  # noqa: E402
from crn_fast.config import get_preset, parse_resolution  # noqa: E402
from crn_fast.labels import one_hot  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--res", default="1024x2048")
    ap.add_argument("--preset", default="1024p")
    args = ap.parse_args()
    h, w = parse_resolution(args.res)
    cfg = get_preset(args.preset)
    x = one_hot(torch.randint(0, 20, (1, h, w))).cuda()
    for dt in (torch.bfloat16, torch.float32):
        for fmt in (torch.contiguous_format, torch.channels_last):
            m = CRN(cfg, backend="triton").cuda().to(dt).eval().to(memory_format=fmt)
            xin = x.to(dt).contiguous(memory_format=fmt)
            with torch.no_grad():
                full = min(time_fn(lambda: m(xin), "cuda", 3, 10))
                convs = 0.0
                n = cfg.num_modules
                for i, mod in enumerate(m.refine):
                    hi, wi = h >> (n - 1 - i), w >> (n - 1 - i)
                    a = torch.randn(1, cfg.in_channels(i), hi, wi, device="cuda", dtype=dt).contiguous(memory_format=fmt)
                    b = torch.randn(1, cfg.widths[i], hi, wi, device="cuda", dtype=dt).contiguous(memory_format=fmt)
                    convs += min(time_fn(lambda: (mod.conv1(a), mod.conv2(b)), "cuda", 2, 5))
            print(f"{str(dt):15s} {str(fmt):24s} generator {full:8.2f} ms   convs alone {convs:8.2f} ms", flush=True)
            del m


if __name__ == "__main__":
    main()
