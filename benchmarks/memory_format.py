"""Where the convolutions' time goes at 1024x2048 (GPU), per dtype and memory format: the whole
triton generator, the 19 convs alone, and the convs alone with the layout zero-padded to a
multiple of 8 channels (conv1 input 1048 / 536 / 152 instead of 1044 / 532 / 148: zero channels
with zero weights compute the same result). Padding would be kept only if the padded convs are
measurably faster. --train: the 19 convs' forward and backward (weight gradients, and input
gradients but for module 0's conv1, whose input is the layout), as a bf16 training step runs them,
unpadded and padded (the triton backend's training cascade pads: crn_fast.model.layout_pad).

    python benchmarks/memory_format.py [--res 1024x2048] [--preset 1024p] [--train] [--json PATH]
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import device_label, machine_info, results_path, time_fn, write_text_atomic  # noqa: E402

from crn_fast import CRN  # noqa: E402
from crn_fast.config import get_preset, parse_resolution  # noqa: E402
from crn_fast.errors import CRNError  # noqa: E402
from crn_fast.labels import one_hot  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def convs_ms(cfg, h, w, dt, fmt, pad_to: int = 1, train: bool = False) -> float:
    """Sum over modules of conv1 + conv2 alone (min of 5 after 2 warm-ups), conv1's input padded;
    train: forward and backward."""
    total, n = 0.0, cfg.num_modules
    for i in range(n):
        hi, wi = h >> (n - 1 - i), w >> (n - 1 - i)
        cin = -(-cfg.in_channels(i) // pad_to) * pad_to
        c1 = torch.nn.Conv2d(cin, cfg.widths[i], 3, padding=1, bias=False).cuda().to(dt).to(memory_format=fmt)
        c2 = torch.nn.Conv2d(cfg.widths[i], cfg.widths[i], 3, padding=1, bias=False).cuda().to(dt) \
            .to(memory_format=fmt)
        a = torch.randn(1, cin, hi, wi, device="cuda", dtype=dt).contiguous(memory_format=fmt)
        b = torch.randn(1, cfg.widths[i], hi, wi, device="cuda", dtype=dt).contiguous(memory_format=fmt)
        if train:
            gy = torch.randn(1, cfg.widths[i], hi, wi, device="cuda", dtype=dt).contiguous(memory_format=fmt)
            a.requires_grad_(i > 0)  # module 0's conv1 reads the layout: no input gradient
            b.requires_grad_()

            def step():
                torch.autograd.grad(c1(a), [c1.weight] + ([a] if i else []), gy)
                torch.autograd.grad(c2(b), [c2.weight, b], gy)
            total += min(time_fn(step, "cuda", 2, 5))
        else:
            with torch.no_grad():
                total += min(time_fn(lambda: (c1(a), c2(b)), "cuda", 2, 5))
    return total


def train_rows(cfg, h, w, out) -> int:
    """--train: bf16, channels_last then NCHW, unpadded and padded, into out after every row."""
    rows = []
    for fmt in (torch.channels_last, torch.contiguous_format):
        row = {"dtype": "torch.bfloat16", "format": str(fmt), "train_convs_ms": convs_ms(
            cfg, h, w, torch.bfloat16, fmt, train=True), "train_convs_padded8_ms": convs_ms(
            cfg, h, w, torch.bfloat16, fmt, pad_to=8, train=True)}
        rows.append(row)
        write_text_atomic(out, json.dumps({"machine": machine_info("cuda"), "train": True, "rows": rows}, indent=2))
        print(f"bf16 {str(fmt):24s} convs forward + backward {row['train_convs_ms']:8.2f} ms   padded to 8: "
              f"{row['train_convs_padded8_ms']:8.2f} ms", flush=True)
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--res", default="1024x2048")
    ap.add_argument("--preset", default="1024p")
    ap.add_argument("--train", action="store_true", help="the convs' forward + backward, unpadded and padded")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("memory_format.py: error: needs a CUDA GPU", file=sys.stderr)
        return 2
    try:
        h, w = parse_resolution(args.res)
        cfg = get_preset(args.preset)
        cfg.validate_input_size(h, w)
    except CRNError as e:
        ap.error(str(e))
    x = one_hot(torch.randint(0, 20, (1, h, w))).cuda()
    out = results_path(ap, args.json or ROOT / "benchmarks" / "results" /
                       f"memory_format_{device_label('cuda')}_{h}x{w}{'_train' if args.train else ''}.json")
    if args.train:
        return train_rows(cfg, h, w, out)
    rows = []
    for dt in (torch.bfloat16, torch.float32):
        for fmt in (torch.contiguous_format, torch.channels_last):
            m = CRN(cfg, backend="triton", memory_format=fmt).cuda().to(dt).eval()
            xin = x.to(dt).contiguous(memory_format=fmt)
            with torch.no_grad():
                full = min(time_fn(lambda: m(xin), "cuda", 3, 10))
            row = {"dtype": str(dt), "format": str(fmt), "generator_ms": full, "convs_ms": convs_ms(cfg, h, w, dt, fmt),
                   "convs_padded8_ms": convs_ms(cfg, h, w, dt, fmt, pad_to=8)}
            rows.append(row)
            # after every row: a run cut short by a time limit keeps what it measured
            write_text_atomic(out, json.dumps({"machine": machine_info("cuda"), "rows": rows}, indent=2))
            print(f"{str(dt):15s} {str(fmt):24s} generator {full:8.2f} ms   convs alone {row['convs_ms']:8.2f} ms"
                  f"   padded to 8: {row['convs_padded8_ms']:8.2f} ms", flush=True)
            m = None  # free the model before the next format
    return 0


if __name__ == "__main__":
    sys.exit(main())
