"""Sweep the LayerNorm/RMSNorm launch knobs of engine/kernels/norm.py on CUDA, beside torch (bf16 activations/weights).

PYTHONPATH=. python tools/gpu_norm_sweep.py [--shapes 16384x4096,8192x1024] [--ops layer_norm,rms_norm]

For each shape and op, three phases (each starts from the module's defaults plus the best of the previous
phases; A and B pick by backward time, C by forward time):

  A. backward tile and warps: bwd_elems_per_thread (so BLOCK_M) x bwd_warps, at the default programs/SM and stages
  B. backward programs per SM (partials_per_sm; it also sets the register cap) x bwd_stages
  C. forward tile: fwd_tile (BLOCK_M rows per forward program)

Each setting is a ``NormLaunch`` passed to the public functions as ``launch=`` (nothing global is changed).

Bytes counted: backward 3 x |x| (read x and dy, write dx), forward 2 x |x|, fwd+bwd 5 x |x|; the partial
rows and parameters are left out. "% copy" is against a torch copy of x (read + write) on the same GPU.
Every Triton row is checked against torch first (max |error| / max |value| of dx, dweight, dbias); `regs` and
`spills` are what the driver reports for the backward kernel as launched.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools

import torch
import torch.nn.functional as F
from triton.testing import do_bench

import engine.kernels.norm as norm
from engine import kernels

KNOBS = ("bwd_elems_per_thread", "bwd_warps", "partials_per_sm", "bwd_stages", "fwd_tile")
DEFAULTS = {k: getattr(norm.DEFAULT_LAUNCH, k) for k in KNOBS}


def launch_with(**values) -> norm.NormLaunch:
    """The default launch configuration with ``values`` replaced (knob names of ``norm.NormLaunch``)."""
    return dataclasses.replace(norm.DEFAULT_LAUNCH, **values)


def ms(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


class Case:
    def __init__(self, rows: int, hidden: int, op: str) -> None:
        self.rows, self.hidden, self.op = rows, hidden, op
        dev, bf16 = "cuda", torch.bfloat16
        self.x = torch.randn(rows, hidden, device=dev, dtype=bf16, requires_grad=True)
        self.w = (1 + 0.1 * torch.randn(hidden, device=dev)).to(bf16).requires_grad_(True)
        self.b = (0.1 * torch.randn(hidden, device=dev)).to(bf16).requires_grad_(True) if op == "layer_norm" else None
        self.dy = torch.randn_like(self.x)
        self.leaves = [t for t in (self.x, self.w, self.b) if t is not None]
        self.nbytes = self.x.numel() * self.x.element_size()
        self.launch = norm.DEFAULT_LAUNCH  # the setting ``ours`` runs with
        if op == "layer_norm":
            self.ours = lambda: kernels.layer_norm(self.x, self.w, self.b, launch=self.launch)
            self.torch = lambda: F.layer_norm(self.x, (hidden,), self.w, self.b)
        else:
            self.ours = lambda: kernels.rms_norm(self.x, self.w, 1e-6, launch=self.launch)
            self.torch = lambda: F.rms_norm(self.x, (hidden,), self.w, 1e-6)
        self.expected = torch.autograd.grad(self.torch(), self.leaves, self.dy)

    def grads(self, fn):
        return torch.autograd.grad(fn(), self.leaves, self.dy)

    def times(self, fn) -> tuple[float, float, float]:
        """(fwd, bwd, fwd+bwd) in ms."""
        fwd = ms(lambda: fn())
        y = fn()
        bwd = ms(lambda: torch.autograd.grad(y, self.leaves, self.dy, retain_graph=True))
        both = ms(lambda: self.grads(fn))
        return fwd, bwd, both

    def bwd_kernel_resources(self) -> str:
        """Registers and spills of the backward kernel at the current knobs (one direct launch)."""
        x2, w = self.x.detach(), self.w.detach()
        xf = x2.float()
        rstd = torch.rsqrt(xf.var(-1, unbiased=False) + 1e-5)
        mean = xf.mean(-1)
        cfg = norm._bwd_config(self.rows, self.hidden, x2.device, self.launch)
        dw_part = torch.empty(cfg.programs, self.hidden, device=x2.device)
        db_part = torch.empty_like(dw_part) if self.b is not None else None
        k = norm._launch_bwd(
            cfg, x2, self.dy, torch.empty_like(x2), w, mean, rstd, dw_part, db_part, self.op == "rms_norm"
        )
        return f"{getattr(k, 'n_regs', '?')} | {getattr(k, 'n_spills', '?')}"


def row(case: Case, label: str, copy_gbs: float, fn, check: bool) -> tuple[tuple[float, float, float], str]:
    fwd, bwd, both = case.times(fn)
    n = case.nbytes
    gbs = [2 * n / fwd / 1e6, 3 * n / bwd / 1e6, 5 * n / both / 1e6]
    if check:
        err = max(rel_err(g, e) for g, e in zip(case.grads(fn), case.expected))
        cfg = norm._bwd_config(case.rows, case.hidden, case.x.device, case.launch)
        fwd_cfg = norm._fwd_config(case.hidden, case.launch)
        extra = (
            f"{fwd_cfg[0]} / {fwd_cfg[3]} | {cfg.block_m} | {cfg.num_warps} | {cfg.programs} | "
            f"{cfg.stages} | {cfg.maxnreg} | {case.bwd_kernel_resources()} | "
            f"{'ok' if err < 3e-2 else 'BAD'} {err:.1e}"
        )
    else:
        extra = " | ".join(["-"] * 9)
    cells = " | ".join(f"{g:.0f} ({100 * g / copy_gbs:.0f}%)" for g in gbs)
    return (fwd, bwd, both), f"| {label} | {cells} | {extra} |"


HEADER = (
    "| setting | fwd GB/s (% copy) | bwd GB/s (% copy) | fwd+bwd GB/s (% copy) | fwd BLOCK_M / warps | "
    "bwd BLOCK_M | warps | programs | stages | maxnreg | regs | spills | check |\n" + "|---" * 13 + "|"
)


def phase(case: Case, title: str, copy_gbs: float, base: dict, grid: dict, by: int = 1) -> dict:
    """Times every combination of `grid` on top of `base`; returns base updated with the fastest one, by
    forward (by=0), backward (1) or fwd+bwd (2) time."""
    print(f"\n#### {case.op} {case.rows}x{case.hidden}: {title}\n\n{HEADER}")
    case.launch = norm.DEFAULT_LAUNCH
    print(row(case, "torch", copy_gbs, case.torch, check=False)[1])
    best, best_t = dict(base), float("inf")
    keys = list(grid)
    for values in itertools.product(*(grid[k] for k in keys)):
        knobs = {**base, **dict(zip(keys, values))}
        case.launch = launch_with(**knobs)
        label = ", ".join(f"{k}={v}" for k, v in zip(keys, values))
        try:
            times, line = row(case, label, copy_gbs, case.ours, check=True)
        except Exception as err:  # a setting the compiler rejects (e.g. out of shared memory): report, go on
            print(f"| {label} | failed: {type(err).__name__}: {str(err)[:120]} |")
            continue
        print(line, flush=True)
        if times[by] < best_t:
            best, best_t = knobs, times[by]
    case.launch = norm.DEFAULT_LAUNCH
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="16384x4096,8192x1024")
    parser.add_argument("--ops", default="layer_norm,rms_norm")
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}, defaults: {DEFAULTS}")
    for shape in args.shapes.split(","):
        rows, hidden = map(int, shape.split("x"))
        src = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
        dst = torch.empty_like(src)
        copy_gbs = 2 * src.numel() * 2 / ms(lambda: dst.copy_(src)) / 1e6  # noqa: B023
        print(f"\n### {rows}x{hidden} bf16: torch copy {copy_gbs:.0f} GB/s")
        for op in args.ops.split(","):
            case = Case(rows, hidden, op)
            best = phase(
                case,
                "A. backward tile x warps",
                copy_gbs,
                {},
                {"bwd_elems_per_thread": (8, 16, 32), "bwd_warps": (None, 4, 8, 16)},
            )
            best = phase(
                case,
                "B. backward programs/SM x stages",
                copy_gbs,
                best,
                {"partials_per_sm": (None, 1, 2, 4, 8), "bwd_stages": (1, 2, 3, 4)},
            )
            best = phase(case, "C. forward tile", copy_gbs, best, {"fwd_tile": (hidden, 2048, 4096, 8192, 16384)}, by=0)
            print(f"\nbest for {op} {rows}x{hidden} (A, B by backward time, C by forward): {best or 'the defaults'}")


if __name__ == "__main__":
    main()
