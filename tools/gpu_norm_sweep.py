"""Sweep the LayerNorm/RMSNorm backward's launch settings on CUDA (warps, partial rows per SM, pipelining
depth of the row loop), beside torch. PYTHONPATH=. python tools/gpu_norm_sweep.py  (bwd bytes: x, dy read, dx written)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from triton.testing import do_bench

import kernels
import kernels.norm as norm


def main() -> None:
    rows, hidden = 16384, 4096
    x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    nbytes = x.numel() * 2
    print("| op | warps | partials/SM | stages | bwd GB/s (median of 2 runs) |\n|---|---|---|---|---|")
    for name, fn, ref in (("layer_norm", lambda: kernels.layer_norm(x, w, b),
                           lambda: F.layer_norm(x, (hidden,), w, b)),
                          ("rms_norm", lambda: kernels.rms_norm(x, w), lambda: F.rms_norm(x, (hidden,), w, 1e-6))):
        settings = [("torch", None, None, None)] + [
            ("triton", wp, ps, st) for wp in (8, 16) for ps in (1, 2, 4) for st in (1, 2, 3)]
        for label, warps, per_sm, stages in settings:
            if warps:
                norm.BWD_WARPS, norm.PARTIALS_PER_SM, norm.BWD_STAGES = warps, per_sm, stages
            y = (ref if label == "torch" else fn)()
            ts = [do_bench(lambda y=y: torch.autograd.grad(y, (x, w), dy, retain_graph=True), return_mode="median")
                  for _ in range(2)]
            print(f"| {name} {label} | {warps} | {per_sm} | {stages} | {3 * nbytes / max(ts) / 1e6:.0f} "
                  f"({3 * nbytes / min(ts) / 1e6:.0f}) |")


if __name__ == "__main__":
    main()
