"""``python -m engine.bench kernels``: Trident's Triton kernels next to their torch equivalents.

On CUDA: the device's measured copy bandwidth and bf16 matmul peak, then per kernel the achieved GB/s
(memory-bound ops) or TFLOP/s (attention) beside F.layer_norm, F.rms_norm, SDPA (flash backend),
F.cross_entropy (with peak memory) and torch.optim.AdamW(fused=True) on the same flat buffers.
On CPU: tiny sizes, Triton's interpreter against the torch reference (max error and time); no GPU
figure is measured there and the output says so.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence

import torch


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _cuda_time(fn: Callable[[], object], *, warmup: int = 3, iters: int = 10) -> float:
    """Median seconds per call, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def _graph_time(fn: Callable[[], object], *, calls: int = 10, replays: int = 5) -> float:
    """Median seconds per call with the host out of the loop: ``calls`` calls captured in one CUDA graph,
    replayed. What a step under ``train.cuda_graphs`` sees; ``_cuda_time`` also counts launch overhead."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return _cuda_time(graph.replay, warmup=1, iters=replays) / calls


def _cpu_time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _fwd_bwd(fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], dout):
    """One forward and backward of ``fn``; ``dout`` is the output's gradient (a tuple for tuple outputs;
    None: ones)."""

    def run() -> torch.Tensor:
        out = fn(*inputs)
        grad = torch.ones_like(out) if dout is None else dout
        torch.autograd.grad(out, [t for t in inputs if t.requires_grad], grad)
        return out

    return run


def fused_cases(dev: str, *, tokens: int) -> list[tuple]:
    """The fused block pieces at gpt2-350m / llama-style widths for ``tokens`` tokens, beside their unfused
    torch form: (name, "GB/s", ours, theirs, bytes). Also built on CPU by the tests (reference kernels)."""
    import torch.nn.functional as F

    from engine import kernels

    bf16 = torch.bfloat16
    xr = torch.randn(tokens, 1024, device=dev, dtype=bf16, requires_grad=True)
    rr = torch.randn_like(xr, requires_grad=True)
    w1 = torch.ones(1024, device=dev, dtype=bf16, requires_grad=True)
    b1 = torch.zeros(1024, device=dev, dtype=bf16, requires_grad=True)
    d_pair = (torch.randn_like(xr), torch.randn_like(xr))

    def unfused_add_ln(x_, r_, w_, b_):
        total = x_ + r_
        return total, F.layer_norm(total, (1024,), w_, b_)

    h = torch.randn(tokens, 4096, device=dev, dtype=bf16, requires_grad=True)
    hb = torch.randn(4096, device=dev, dtype=bf16, requires_grad=True)
    gu = torch.randn(tokens, 2 * 2816, device=dev, dtype=bf16, requires_grad=True)
    seq = min(tokens, 1024)
    qkv = torch.randn(seq, tokens // seq, 3 * 1024, device=dev, dtype=bf16, requires_grad=True)
    from engine.model.positions import apply_rope, rope_tables

    cos, sin = (t.to(dev) for t in rope_tables(seq, 64, theta=10000.0))

    def unfused_rope(t):
        heads = t.unflatten(-1, (48, 64)).permute(1, 2, 0, 3)
        q_, k_, v_ = heads[:, :16], heads[:, 16:32], heads[:, 32:]
        return torch.cat((apply_rope(q_, cos, sin), apply_rope(k_, cos, sin), v_), 1)

    return [
        (
            f"add + layer_norm fwd+bwd ({tokens}×1024)",
            "GB/s",
            _fwd_bwd(lambda *a: kernels.add_layer_norm(*a), (xr, rr, w1, b1), d_pair),
            _fwd_bwd(unfused_add_ln, (xr, rr, w1, b1), d_pair),
            # fwd: read x, r, write sum, y; bwd: read sum, dy, dsum, write dx
            8 * xr.numel() * xr.element_size(),
        ),
        (
            f"bias + gelu fwd+bwd ({tokens}×4096)",
            "GB/s",
            _fwd_bwd(kernels.bias_gelu, (h, hb), torch.randn_like(h)),
            _fwd_bwd(lambda a, b_: F.gelu(a + b_, approximate="tanh"), (h, hb), torch.randn_like(h)),
            5 * h.numel() * h.element_size(),
        ),  # fwd: read h, write y; bwd: read dy, h, write dh
        (
            f"swiglu fwd+bwd ({tokens}×2·2816)",
            "GB/s",
            _fwd_bwd(kernels.swiglu, (gu,), torch.randn(tokens, 2816, device=dev, dtype=bf16)),
            _fwd_bwd(
                lambda t: F.silu(t[..., :2816]) * t[..., 2816:],
                (gu,),
                torch.randn(tokens, 2816, device=dev, dtype=bf16),
            ),
            # fwd: read 2F, write F; bwd: read F + 2F, write 2F
            4 * gu.numel() * gu.element_size(),
        ),
        (
            f"rope on packed qkv fwd+bwd ({seq}×{tokens // seq}×3·1024)",
            "GB/s",
            _fwd_bwd(lambda t: kernels.rope_packed(t, cos, sin, 16, 16), (qkv,), torch.randn_like(qkv)),
            _fwd_bwd(unfused_rope, (qkv,), torch.randn(tokens // seq, 48, seq, 64, device=dev, dtype=bf16)),
            4 * qkv.numel() * qkv.element_size(),
        ),  # read + write, each way
    ]


def _gpu_cases(small: bool) -> list[tuple]:
    """(name, kind, triton_fn, torch_fn, work) with work in bytes ('GB/s') or FLOPs ('TFLOP/s')."""
    import torch.nn.functional as F

    from engine import kernels

    dev, bf16 = "cuda", torch.bfloat16
    rows, hidden = (4096, 2048) if small else (16384, 4096)
    x = torch.randn(rows, hidden, device=dev, dtype=bf16, requires_grad=True)
    w = torch.ones(hidden, device=dev, dtype=bf16, requires_grad=True)
    b = torch.zeros(hidden, device=dev, dtype=bf16, requires_grad=True)
    dy = torch.randn_like(x)
    norm_bytes = 5 * x.numel() * x.element_size()  # fwd: read x, write y; bwd: read x, dy, write dx
    cases = [
        (
            "layer_norm fwd+bwd",
            "GB/s",
            _fwd_bwd(kernels.layer_norm, (x, w, b), dy),
            _fwd_bwd(lambda *a: F.layer_norm(a[0], (hidden,), a[1], a[2]), (x, w, b), dy),
            norm_bytes,
        ),
        (
            "rms_norm fwd+bwd",
            "GB/s",
            _fwd_bwd(kernels.rms_norm, (x, w), dy),
            _fwd_bwd(lambda *a: F.rms_norm(a[0], (hidden,), a[1], 1e-6), (x, w), dy),
            norm_bytes,
        ),
    ]
    cases += fused_cases(dev, tokens=4096 if small else 8192)
    for seq in (1024,) if small else (1024, 2048, 4096, 8192):
        batch = max(1, 16384 // seq)  # the same number of tokens at every length
        for dim in (64, 128):
            heads = 2048 // dim
            q, k, v = (
                torch.randn(batch, heads, seq, dim, device=dev, dtype=bf16, requires_grad=True) for _ in range(3)
            )
            do = torch.randn_like(q)
            # fwd 2 matmuls, bwd 5 (dV, dP, dQ, dK and the recomputed S), each 2*S*S*d per head; causal halves
            flops = batch * heads * 7 * 2 * seq * seq * dim / 2

            def sdpa(q_, k_, v_):
                with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(q_, k_, v_, is_causal=True)

            cases.append(
                (
                    f"attention causal d{dim} B{batch} S{seq} fwd+bwd",
                    "TFLOP/s",
                    _fwd_bwd(lambda a, b_, c: kernels.attention(a, b_, c, causal=True), (q, k, v), do),
                    _fwd_bwd(sdpa, (q, k, v), do),
                    flops,
                )
            )
    n, vocab = (2048, 50304) if small else (8192, 50304)
    logits = torch.randn(n, vocab, device=dev, dtype=bf16, requires_grad=True)
    target = torch.randint(0, vocab, (n,), device=dev)
    cases.append(
        (
            "cross_entropy V50304 fwd+bwd",
            "GB/s",
            # in place, as the model calls it: the gradient overwrites the (dead) logits
            _fwd_bwd(lambda lg: kernels.cross_entropy(lg, target, inplace_backward=True), (logits,), None),
            _fwd_bwd(lambda lg: F.cross_entropy(lg, target), (logits,), None),
            3 * logits.numel() * logits.element_size(),
        )
    )
    numel = (16 if small else 128) * 2**20
    p, g, m, vv = (torch.randn(numel, device=dev) for _ in range(4))
    ref_p = torch.nn.Parameter(p.clone())
    ref_p.grad = g.clone()
    opt = torch.optim.AdamW([ref_p], lr=1e-4, fused=True)
    step = {"n": 0}

    def ours():
        step["n"] += 1
        kernels.adamw_(p, g, m, vv, lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=step["n"])

    def ours_one_pass():
        step["n"] += 1
        kernels.adamw_(
            p,
            g,
            m,
            vv,
            lr=1e-4,
            beta1=0.9,
            beta2=0.95,
            eps=1e-8,
            weight_decay=0.01,
            step=step["n"],
            check_finite=False,
        )

    # bytes: read p, g, m, v; write p, m, v (the checked form reads g twice: 8 words, counted as 7)
    cases.append(("adamw_ flat fp32 (checks grads: 2 passes)", "GB/s", ours, opt.step, 7 * 4 * numel))
    cases.append(("adamw_ flat fp32 (engine: 1 pass)", "GB/s", ours_one_pass, opt.step, 7 * 4 * numel))
    return cases


def _peak_memory(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _device_peaks() -> tuple[float, float]:
    """(measured device-copy GB/s over 1 GiB, measured bf16 8192^3 matmul TFLOP/s)."""
    src = torch.empty(2**28, device="cuda", dtype=torch.float32)
    dst = torch.empty_like(src)
    copy_gbs = 2 * src.numel() * 4 / _cuda_time(lambda: dst.copy_(src)) / 1e9
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    return copy_gbs, 2 * 8192**3 / _cuda_time(lambda: a @ a) / 1e12


def _run_gpu(small: bool) -> int:
    import triton

    props = torch.cuda.get_device_properties(0)
    copy_gbs, peak_tflops = _device_peaks()
    print(f"device: {props.name}, torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}")
    print(f"measured copy bandwidth: {copy_gbs:.0f} GB/s; measured bf16 matmul: {peak_tflops:.0f} TFLOP/s\n")
    rows, notes = [], []
    for name, unit, ours, theirs, work in _gpu_cases(small):
        t_ours, t_torch = _cuda_time(ours), _cuda_time(theirs)
        scale = 1e9 if unit == "GB/s" else 1e12
        peak = copy_gbs if unit == "GB/s" else peak_tflops
        row = [
            name,
            f"{work / t_ours / scale:.1f} {unit}",
            f"{work / t_torch / scale:.1f} {unit}",
            f"{t_torch / t_ours:.2f}x",
            f"{100 * work / t_ours / scale / peak:.0f}%",
        ]
        if name.startswith("adamw_"):
            # torch's fused AdamW is not capturable as built here, and a 128 Mi-element step is not host-bound
            row += ["-", "-", "-"]
        else:
            try:
                g_ours, g_torch = _graph_time(ours), _graph_time(theirs)
                row += [
                    f"{work / g_ours / scale:.1f} {unit}",
                    f"{work / g_torch / scale:.1f} {unit}",
                    f"{100 * work / g_ours / scale / peak:.0f}%",
                ]
            except Exception as err:  # reported under the table, the eager figures stand
                notes.append(f"{name}: CUDA-graph timing failed: {type(err).__name__}: {err}".splitlines()[0])
                row += ["n/a", "n/a", "n/a"]
        if name.startswith("cross_entropy"):
            row[0] += f" (peak MiB: ours {_peak_memory(ours):.0f}, torch {_peak_memory(theirs):.0f})"
        rows.append(row)
    print(
        _table(
            [
                "kernel",
                "Triton",
                "torch",
                "speed-up",
                "of measured peak",
                "Triton (graphed)",
                "torch (graphed)",
                "graphed, of peak",
            ],
            rows,
        )
    )
    print(
        "\ngraphed: 10 calls captured in one CUDA graph and replayed (GPU time only, no launch overhead: "
        "what a step under train.cuda_graphs sees)"
    )
    for note in notes:
        print(note)
    return 0


def _run_cpu() -> int:
    from engine import kernels
    from engine.kernels.dispatch import interpreter_loaded

    print("no CUDA device: GPU figures (bandwidth, TFLOP/s, peak memory, ratios) are UNMEASURED.")
    if not interpreter_loaded():
        print("triton was imported without TRITON_INTERPRET=1: only the reference could run; nothing to compare")
        return 1
    print("CPU check at tiny sizes: Triton interpreter vs torch reference (timings are the interpreter's)\n")
    torch.manual_seed(0)
    x, w, b = torch.randn(8, 200), torch.randn(200), torch.randn(200)
    q, k, v = torch.randn(1, 4, 40, 64), torch.randn(1, 2, 40, 64), torch.randn(1, 2, 40, 64)
    logits, target = torch.randn(16, 500), torch.randint(0, 500, (16,))

    def adam():
        p = torch.linspace(-1, 1, 5000)
        kernels.adamw_(
            p,
            torch.sin(p),
            torch.zeros(5000),
            torch.zeros(5000),
            lr=1e-2,
            beta1=0.9,
            beta2=0.95,
            eps=1e-8,
            weight_decay=0.1,
            step=1,
        )
        return p

    qkv = torch.randn(24, 2, 3 * 4 * 16)
    cos, sin = torch.cos(torch.randn(24, 8)), torch.sin(torch.randn(24, 8))
    cases = [
        ("layer_norm (8, 200)", lambda: kernels.layer_norm(x, w, b)),
        ("add + layer_norm (8, 200)", lambda: kernels.add_layer_norm(x, x * 0.5, w, b)[1]),
        ("bias + gelu (8, 200)", lambda: kernels.bias_gelu(x, b)),
        ("swiglu (8, 200)", lambda: kernels.swiglu(x)),
        ("rope on packed qkv (24, 2, 192)", lambda: kernels.rope_packed(qkv, cos, sin, 4, 4)),
        ("attention from packed qkv (24, 2, 192)", lambda: kernels.attention_packed(qkv, 4, 4)),
        ("rms_norm (8, 200)", lambda: kernels.rms_norm(x, w)),
        ("attention GQA causal (1, 4/2, 40, 64)", lambda: kernels.attention(q, k, v, causal=True)),
        ("cross_entropy (16, 500)", lambda: kernels.cross_entropy(logits, target)),
        ("adamw_ (5000,)", adam),
    ]
    rows = []
    for name, fn in cases:
        with _env(TRIDENT_KERNELS="reference"):
            fn()
            t_ref = _cpu_time(fn)
            expected = fn()
        with _env(TRIDENT_KERNELS="triton"):
            fn()  # first call pays the interpreter's AST rewrite
            t_tri = _cpu_time(fn)
            got = fn()
        err = (got.double() - expected.double()).abs().max().item()
        rows.append([name, f"{err:.1e}", f"{t_ref * 1e3:.1f} ms", f"{t_tri * 1e3:.1f} ms"])
    print(_table(["kernel", "max abs error", "reference (CPU)", "Triton interpreter"], rows))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.bench kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="smaller GPU sizes (quick check)")
    args = parser.parse_args(argv)
    if torch.cuda.is_available():
        return _run_gpu(args.small)
    if "triton" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton's first import: see engine.kernels.dispatch
    return _run_cpu()
