"""Random cases for crn_fast's Triton operators and the triton generator, each against its torch
reference: random batch, channel counts, odd sizes and non-2x scales, fp32/bf16, and inputs that
are NCHW, channels_last or strided views (a channel slice of a wider buffer in either format,
every other column), forward and, where an operator has one, backward.

    python tests/fuzz_kernels.py --cases 300 --seed 1       # CPU: Triton's interpreter
    python tests/fuzz_kernels.py --cases 2000 --device cuda  # a GPU: the compiled kernels

Each failure prints its family, seed and case (rerun one with --family F --seed S --cases N) and
the error; the exit status is 1 if any case failed. tests/test_kernels.py keeps fixed cases of
each kind; this finds the ones nobody wrote down (tests/test_kernels.py::test_fuzz_smoke runs a few).
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import traceback

if __name__ == "__main__" and not any(a.endswith("cuda") for a in sys.argv[1:]):  # the interpreter, before Triton loads
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from crn_fast import CRN, CRNConfig  # noqa: E402
from crn_fast import kernels as K  # noqa: E402
from crn_fast.fast_inference import CONV_MODES  # noqa: E402

VIEWS = ("nchw", "channels_last", "channel_slice", "channel_slice_cl", "every_other_column")
# element-wise tolerances: fp32 to a few ulps of O(1) outputs; bf16 a few of its ulps
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=5e-2, rtol=3e-2)}
GRAD_TOL = {torch.float32: dict(atol=2e-4, rtol=2e-4), torch.bfloat16: dict(atol=1.5e-1, rtol=6e-2)}


def view_of(t: torch.Tensor, view: str) -> torch.Tensor:
    """t's values laid out as ``view`` (one of VIEWS)."""
    n, c, h, w = t.shape
    if view == "nchw":
        return t.contiguous()
    if view == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if view == "every_other_column":
        full = t.new_zeros(n, c, h, 2 * w)
        full[..., ::2] = t
        return full[..., ::2]
    fmt = torch.channels_last if view == "channel_slice_cl" else torch.contiguous_format
    full = t.new_zeros(n, c + 3, h, w).contiguous(memory_format=fmt)
    full[:, 1:c + 1] = t
    return full[:, 1:c + 1]


class Case:
    """Random draws for one case, recorded so that a failure can say what it was."""

    def __init__(self, rng: random.Random, device: str):
        self.rng, self.device, self.drawn = rng, device, {}
        self.gen = torch.Generator().manual_seed(rng.randrange(1 << 30))

    def pick(self, name, options):
        self.drawn[name] = v = self.rng.choice(options)
        return v

    def int(self, name, lo, hi):
        self.drawn[name] = v = self.rng.randint(lo, hi)
        return v

    def randn(self, *shape, dtype=torch.float32, view=None, scale=1.0, shift=0.0):
        t = (torch.randn(shape, generator=self.gen) * scale + shift).to(self.device, dtype)
        return view_of(t, view) if view else t

    def rand(self, *shape, dtype=torch.float32, view=None):
        t = torch.rand(shape, generator=self.gen).to(self.device, dtype)
        return view_of(t, view) if view else t


def _grad(out, inputs, dy):
    return torch.autograd.grad(out, inputs, dy)


def layer_norm(c: Case):
    n, ch, h, w = c.pick("n", [1, 2, 3]), c.pick("c", [1, 2, 3, 5, 16, 33, 100, 300]), c.int("h", 1, 9), c.int("w", 1, 11)
    dt, view, programs = c.pick("dtype", list(TOL)), c.pick("view", VIEWS), c.pick("programs", [None, 1, 2, 3, 7])
    x = c.randn(n, ch, h, w, dtype=dt, view=view, scale=2.0, shift=0.5)
    wt, b = c.randn(ch, dtype=dt, scale=0.5, shift=1.0), c.randn(ch, dtype=dt, scale=0.3)
    xs, ws, bs = (t.detach().requires_grad_() for t in (x, wt, b))
    y = K.layer_norm_lrelu(xs, ws, bs, num_programs=programs)
    xr, wr, br = (t.detach().float().requires_grad_() for t in (x, wt, b))
    ref = K.layer_norm_lrelu_reference(xr, wr, br)
    torch.testing.assert_close(y.float(), ref, **TOL[dt])
    dy = c.randn(*y.shape, dtype=dt, view=c.pick("grad_view", VIEWS))
    # dweight and dbias sum over N*H*W terms: their rounding grows with the square root of the count
    grow = max(1.0, (n * h * w) ** 0.5 / 4)
    for got, want in zip(_grad(y, (xs, ws, bs), dy), _grad(ref, (xr, wr, br), dy.float())):
        tol = GRAD_TOL[dt]
        torch.testing.assert_close(got.float(), want, atol=tol["atol"] * grow, rtol=tol["rtol"])
    mean, rstd = K.layer_norm_stats(x, num_programs=programs)
    var, ref_mean = torch.var_mean(x.double(), dim=(1, 2, 3), correction=0)
    torch.testing.assert_close(mean.double(), ref_mean, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(K.norm_lrelu(x, mean, rstd, wt, b).float(),
                                   K.norm_lrelu_reference(x.float(), mean, rstd, wt.float(), b.float()), **TOL[dt])


def _upsample_inputs(c: Case):
    n, ch, h, w = c.pick("n", [1, 1, 2, 3]), c.pick("c", [1, 2, 3, 5, 8, 17, 33, 40, 70]), c.int("h", 1, 7), c.int("w", 1, 9)
    exact = c.pick("exact_2x", [True, True, False])
    H, W = (2 * h, 2 * w) if exact else (c.int("H", 1, 16), c.int("W", 1, 16))
    dt = c.pick("dtype", list(TOL))
    f = c.randn(n, ch, h, w, dtype=dt, view=c.pick("view", VIEWS))
    lab = c.rand(n, c.pick("classes", [1, 3, 20, 21]), H, W, dtype=dt, view=c.pick("label_view", VIEWS))
    return f, lab, dt


def upsample(c: Case):
    f, lab, dt = _upsample_inputs(c)
    fs, fr = f.detach().requires_grad_(), f.detach().float().requires_grad_()
    out, ref = K.upsample_concat(fs, lab), K.upsample_concat_reference(fr, lab.float())
    torch.testing.assert_close(out.float(), ref, **TOL[dt])
    dy = c.randn(*out.shape, dtype=dt, view=c.pick("grad_view", VIEWS))
    torch.testing.assert_close(_grad(out, fs, dy)[0].float(), _grad(ref, fr, dy.float())[0], **GRAD_TOL[dt])


def fused_upsample(c: Case):
    f, lab, dt = _upsample_inputs(c)
    n, ch = f.shape[:2]
    mean, rstd = c.randn(n), c.rand(n) + 0.5
    wt, b = c.randn(ch, dtype=dt), c.randn(ch, dtype=dt)
    with torch.no_grad():
        out = K.norm_lrelu_upsample_concat(f, mean, rstd, wt, b, lab, channels_multiple=c.pick("multiple", [1, 8, 16]))
    ref = K.norm_lrelu_upsample_concat_reference(f.float(), mean, rstd, wt.float(), b.float(), lab.float())
    torch.testing.assert_close(out.float(), ref, **TOL[dt])


def pyramid(c: Case):
    levels = c.int("levels", 1, 6)
    h, w = (2 ** (levels - 1) * c.int(k, 1, 3) for k in ("h_mult", "w_mult"))
    dt = c.pick("dtype", list(TOL))
    x = c.rand(c.pick("n", [1, 2]), c.pick("c", [1, 3, 20]), h, w, dtype=dt, view=c.pick("view", VIEWS))
    got, want = K.area_pyramid(x, levels), K.area_pyramid_reference(x.float(), levels)
    assert [g.shape for g in got] == [v.shape for v in want], ([g.shape for g in got], [v.shape for v in want])
    for g, v in zip(got, want):
        torch.testing.assert_close(g.float(), v, **TOL[dt])


def _close_to_scale(got, want, rel):
    """Max error within ``rel`` of the reference's largest magnitude (a conv's sum of products)."""
    err, scale = (got.float() - want).abs().max().item(), want.abs().max().item() + 1e-6
    assert err <= rel * scale, f"max error {err:.4g} is {err / scale:.3g} of the output scale {scale:.4g} (> {rel})"


CONV_REL = {torch.float32: 1e-4, torch.bfloat16: 2.5e-2}


def conv(c: Case):
    n, cin, cout = c.pick("n", [1, 2]), c.pick("cin", [1, 3, 8, 20, 24, 33, 70]), c.pick("cout", [1, 3, 8, 16, 40])
    h, w, k = c.int("h", 1, 9), c.int("w", 1, 12), c.pick("k", [1, 3, 3])
    dt, stats = c.pick("dtype", list(TOL)), c.pick("stats", [True, True, False])
    head = k == 1 and c.pick("head", [True, False])
    x = c.randn(n, cin, h, w, dtype=dt, view=c.pick("view", VIEWS))
    weight = c.randn(cout, cin, k, k, dtype=dt, scale=(cin * k * k) ** -0.5)
    bias = c.randn(cout, dtype=dt) if c.pick("bias", [True, False]) else None
    norm = (c.randn(n), c.rand(n) + 0.5, c.randn(cin, dtype=dt), c.randn(cin, dtype=dt)) \
        if c.pick("norm_in", [True, False]) else None
    with torch.no_grad():
        res = K.conv_norm(x, K.pack_conv_weight(weight), bias, norm, stats=stats, head=head)
    y = res[0] if stats else res
    ref = K.conv_norm_reference(x, weight, bias, norm, head=head)
    assert y.shape == ref.shape, (y.shape, ref.shape)
    _close_to_scale(y, ref, CONV_REL[dt])
    if stats:  # of y as stored
        var, mean = torch.var_mean(y.double(), dim=(1, 2, 3), correction=0)
        torch.testing.assert_close(res[1].double(), mean, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(res[2].double(), torch.rsqrt(var + 1e-12), atol=1e-2, rtol=2e-3)


def upsample_conv(c: Case):
    n, cf, cl, cout = c.pick("n", [1, 2]), c.pick("cf", [1, 4, 16, 33]), c.pick("classes", [1, 3, 20]), \
        c.pick("cout", [8, 16, 32, 40])
    h, w, dt = c.int("h", 1, 6), c.int("w", 1, 8), c.pick("dtype", list(TOL))
    f = c.randn(n, cf, h, w, dtype=dt, view=c.pick("view", VIEWS))
    lab = c.rand(n, cl, 2 * h, 2 * w, dtype=dt, view=c.pick("label_view", VIEWS))
    weight = c.randn(cout, cf + cl, 3, 3, dtype=dt, scale=((cf + cl) * 9) ** -0.5)
    with torch.no_grad():
        y = K.upsample_conv(f, lab, *K.pack_upsample_conv_weight(weight, cf), stats=False)
    _close_to_scale(y, K.upsample_conv_reference(f, lab, weight), CONV_REL[dt])


def generator(c: Case):
    """A random small CRN, fp32: the triton backend (random conv mode per module, fused head) on a
    random layout in either format equals eager within 2e-3 (of 0..255), without and with grad."""
    modules = c.int("modules", 1, 4)
    widths = tuple(c.pick(f"width{i}", [4, 8, 12, 16, 24]) for i in range(modules))
    cfg = CRNConfig(widths=widths, num_classes=c.pick("classes", [1, 3, 5, 20]), k=c.pick("k", [1, 2]), name="fuzz")
    mult = c.pick("size", [(1, 2), (1, 1), (2, 3)])
    H, W = (4 * 2 ** (modules - 1) * m for m in mult)
    modes = {i: c.pick(f"mode{i}", [m for m in CONV_MODES if i or m != "lowres"]) for i in range(modules)}
    torch.manual_seed(c.rng.randrange(1 << 30))
    eager = CRN(cfg, backend="eager").to(c.device).eval()
    fast = CRN(cfg, backend="triton", fused_conv=modes, fused_head=c.pick("fused_head", [True, False])).to(c.device)
    fast.load_state_dict(eager.state_dict())
    layout = c.rand(c.pick("n", [1, 2]), cfg.num_classes, H, W, view=c.pick("view", ["nchw", "channels_last"]))
    with torch.no_grad():
        torch.testing.assert_close(fast.eval()(layout), eager(layout), atol=2e-3, rtol=0)
    torch.testing.assert_close(fast.train()(layout), eager.train()(layout), atol=2e-3, rtol=0)


FAMILIES = {"layer_norm": (layer_norm, 2), "upsample": (upsample, 2), "fused_upsample": (fused_upsample, 1),
            "pyramid": (pyramid, 1), "conv": (conv, 2), "upsample_conv": (upsample_conv, 1), "generator": (generator, 1)}


def run(cases: int, seed: int, device: str, families=tuple(FAMILIES), out=None) -> int:
    """Run ``cases`` random cases from ``families``, reporting to ``out`` (default: stdout);
    returns the number that failed."""
    out = out or sys.stdout
    import warnings
    warnings.filterwarnings("ignore", message=".*backend='triton'")  # a CPU without the interpreter: eager ops
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # fp32 references
    rng = random.Random(seed)
    names = [f for f in families for _ in range(FAMILIES[f][1])]
    failed = 0
    for i in range(cases):
        family = rng.choice(names)
        case = Case(rng, device)
        try:
            FAMILIES[family][0](case)
        except Exception as e:  # noqa: BLE001 (every failure is reported with its case)
            failed += 1
            print(f"FAILED case {i} (--seed {seed}) {family} {case.drawn}: {type(e).__name__}: {str(e)[:800]}",
                  file=out, flush=True)
            traceback.print_tb(e.__traceback__, limit=-3, file=out)  # where: the innermost frames
    print(f"{cases} cases (seed {seed}, {device}): {failed} failed", file=out, flush=True)
    return failed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--family", action="append", choices=sorted(FAMILIES), help="only these (repeatable)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    return 1 if run(args.cases, args.seed, args.device, tuple(args.family or FAMILIES)) else 0


if __name__ == "__main__":
    sys.exit(main())
