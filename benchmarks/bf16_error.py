"""How far bf16 lands from fp32, for eager (what torch.compile's bf16 rounds like) and for the
triton backend, on the same layout and weights: max abs error, mean abs error and PSNR on 0..255.

    python benchmarks/bf16_error.py --res 256x512             # CPU: the kernels in Triton's interpreter (~2.5 min)
    python benchmarks/bf16_error.py --res 1024x2048 --device cuda

On a CPU the Triton kernels run in Triton's interpreter (set here before they are imported) and
the convs are the CPU's, so the numbers show the rounding of the paths, not a GPU's exact values.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _util, imported once TRITON_INTERPRET is set


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--res", default="256x512", help="HxW (default 256x512)")
    ap.add_argument("--preset", default="1024p", help="architecture (default 1024p)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cpu (Triton's interpreter) or cuda")
    ap.add_argument("--seed", type=int, default=0, help="weights' seed (default 0)")
    ap.add_argument("--json", default=None, help="write the result here")
    args = ap.parse_args(argv)
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before crn_fast.kernels is imported
    import torch
    from crn_fast import CRN
    from crn_fast.config import get_preset, parse_resolution
    from crn_fast.errors import CRNError
    from crn_fast.export.verify import compare, verification_layouts
    try:  # bad input is one line: the imports above wait for TRITON_INTERPRET, so these checks too
        h, w = parse_resolution(args.res)
        get_preset(args.preset).validate_input_size(h, w)
    except CRNError as e:
        ap.error(f"--res {args.res} --preset {args.preset}: {e}")
    from _util import results_path, write_text_atomic
    out = results_path(ap, args.json) if args.json else None
    torch.manual_seed(args.seed)
    model = CRN.from_preset(args.preset).eval().to(args.device)
    x = verification_layouts((h, w), model.config.class_set, count=1).to(args.device)
    result = {"preset": args.preset, "res": [h, w], "device": args.device}
    with torch.no_grad():
        if args.device == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        ref = model(x).float()
        low = CRN.from_preset(args.preset).eval()
        low.load_state_dict(model.state_dict())
        low = low.to(args.device, torch.bfloat16)
        for backend in ("eager", "triton"):
            low.set_backend(backend)
            result[f"{backend}_bf16"] = compare(low(x.to(torch.bfloat16)).float(), ref)
            print(f"{backend} bf16 vs eager fp32: {json.dumps(result[f'{backend}_bf16'])}", file=sys.stderr)
    if out is not None:
        write_text_atomic(out, json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
