"""Compile every kernel for an H100 (sm_90) without a GPU; prints one JSON line of results per kernel.

Run by test_kernels_compile.py in a fresh process: Triton fixes compiled-vs-interpreted at import, and
the kernel tests import it interpreted. Usage: ``python tests/kernels/compile_sm90.py`` from the repo root.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.getcwd())
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from engine.kernels import adamw, attention_bwd, attention_fwd, chunked_cross_entropy, gelu, glu, norm, rope  # noqa: E402

BF16 = "*bf16"
F32 = "*fp32"
ATTN = dict(CAUSAL=True, HAS_ALIBI=True, DOT_PRECISION="tf32", UPCAST_DOT=False, BLOCK_D=64, BLOCK_M=64, BLOCK_N=64)
CASES = {
    "adamw": (
        adamw._adamw_kernel,
        dict(
            P=F32,
            G=BF16,
            M=F32,
            V=F32,
            OUT=BF16,
            FLAG=F32,
            inv_scale="fp32",
            one_minus_beta1="fp32",
            beta2="fp32",
            one_minus_beta2="fp32",
            eps="fp32",
            decay="fp32",
            step_size="fp32",
            bc2_sqrt="fp32",
        ),
        dict(HAS_OUT=True, HAS_FLAG=True, BLOCK=2048),
    ),
    "nonfinite": (adamw._nonfinite_kernel, dict(G=BF16, FLAG=F32, inv_scale="fp32"), dict(BLOCK=2048)),
    "ce_stats": (
        chunked_cross_entropy._stats_kernel,
        dict(X=BF16, TARGET="*i64", MAX=F32, SUMEXP=F32, TLOGIT=F32, vocab_start="i64", ignore_index="i64"),
        dict(BLOCK_V=8192),
    ),
    "ce_grad": (
        chunked_cross_entropy._grad_kernel,
        dict(X=BF16, DX=BF16, TARGET="*i64", LSE=F32, DLOSS=F32, vocab_start="i64", ignore_index="i64"),
        dict(BLOCK_V=8192),
    ),
    "attn_fwd": (
        attention_fwd.attn_fwd_kernel,
        dict(Q=BF16, K=BF16, V=BF16, OUT=BF16, LSE=F32, SLOPES=F32, qk_scale="fp32"),
        ATTN,
    ),
    "attn_dkdv": (
        attention_bwd.attn_bwd_dkdv_kernel,
        dict(
            Q=BF16,
            K=BF16,
            V=BF16,
            DO=BF16,
            LSE=F32,
            DELTA=F32,
            DK=BF16,
            DV=BF16,
            SLOPES=F32,
            sm_scale="fp32",
            qk_scale="fp32",
        ),
        ATTN,
    ),
    "attn_dq": (
        attention_bwd.attn_bwd_dq_kernel,
        dict(
            Q=BF16,
            K=BF16,
            V=BF16,
            DO=BF16,
            LSE=F32,
            DELTA=F32,
            DQ=BF16,
            SLOPES=F32,
            sm_scale="fp32",
            qk_scale="fp32",
        ),
        ATTN,
    ),
    # the attention kernels' new (b, h, s) stride arguments are i32 scalars, the default
    "attn_pre": (
        attention_bwd.attn_bwd_preprocess_kernel,
        dict(OUT=BF16, DO=BF16, DELTA=F32),
        dict(BLOCK_M=64, BLOCK_D=64),
    ),
}

# The norm kernels at the launch configurations engine/kernels/norm.py picks on a GPU (num_warps, BLOCK_M, maxnreg,
# pipelining depth), for bf16 activations and fp32 weights. Triton specialises pointers (16-byte aligned) and
# integers divisible by 16 at launch: hidden sizes and row strides are, so the cases are compiled that way
# (vectorised loads; without it every element is its own load and the register counts mean nothing).
# ptxas then reports registers and spills: the test asserts there are no spills.
NORM_DIVISIBLE = (
    "X", "Y", "DY", "DX", "W", "B", "MEAN", "RSTD", "DW_PART", "DB_PART", "DW", "DB", "R", "S", "DRES",
    "N", "stride_x", "stride_y", "stride_dy", "stride_dx", "stride_r", "stride_s", "stride_dres",
)  # fmt: skip
NORM_FWD_TYPES = dict(X=BF16, Y=BF16, W=F32, B=F32, MEAN=F32, RSTD=F32, R=BF16, S=BF16, eps="fp32")
NORM_BWD_TYPES = dict(X=BF16, DY=BF16, DX=BF16, W=F32, MEAN=F32, RSTD=F32, DW_PART=F32, DB_PART=F32, DRES=BF16)


def _norm_cases() -> dict:
    cases = {}
    for n in (1024, 4096, 8192):
        block_m, block_n, single, warps = norm._fwd_config(n)
        # the fused residual add (add_layer_norm) at 1024, gpt2-350m's hidden size
        for name, has_res in ((f"norm_fwd_{n}", False), (f"add_norm_fwd_{n}", True)):
            if has_res and n != 1024:
                continue
            cases[name] = (
                norm._norm_fwd_kernel,
                NORM_FWD_TYPES,
                dict(IS_RMS=False, HAS_BIAS=True, HAS_RES=has_res, BLOCK_M=block_m, BLOCK_N=block_n, SINGLE=single),
                dict(num_warps=warps, divisible=NORM_DIVISIBLE, ptxas=True),
            )
    # LayerNorm with bias needs the most registers; 16384 takes the chunked path
    for n, kinds in (
        (1024, ("ln", "rms")),
        (2048, ("ln",)),
        (4096, ("ln", "rms")),
        (8192, ("ln", "rms")),
        (16384, ("ln",)),
    ):
        cfg = norm._bwd_config(16384, n, torch.device("cpu"))
        for kind in (*kinds, "addln") if n == 1024 else kinds:
            cases[f"norm_bwd_{kind}_{n}"] = (
                norm._norm_bwd_kernel,
                NORM_BWD_TYPES,
                dict(
                    IS_RMS=kind == "rms",
                    HAS_BIAS=kind != "rms",
                    HAS_DRES=kind == "addln",
                    BLOCK_M=cfg.block_m,
                    BLOCK_N=cfg.block_n,
                    SINGLE=cfg.single,
                    STAGES=cfg.stages,
                ),
                dict(num_warps=cfg.num_warps, maxnreg=cfg.maxnreg, divisible=NORM_DIVISIBLE, ptxas=True),
            )
    # rows longer than MAX_BLOCK_N: the chunked forward, which writes the sum first and normalizes it
    block_m, block_n, single, warps = norm._fwd_config(16384)
    cases["add_norm_fwd_16384"] = (
        norm._norm_fwd_kernel,
        NORM_FWD_TYPES,
        dict(IS_RMS=True, HAS_BIAS=False, HAS_RES=True, BLOCK_M=block_m, BLOCK_N=block_n, SINGLE=single),
        dict(num_warps=warps, divisible=NORM_DIVISIBLE, ptxas=True),
    )
    cases["norm_partials_sum"] = (
        norm._partials_sum_kernel,
        dict(DW_PART=F32, DB_PART=F32, DW=BF16, DB=BF16),
        dict(HAS_BIAS=True, BLOCK_G=norm.DEFAULT_LAUNCH.reduce_block_g, BLOCK_N=norm.DEFAULT_LAUNCH.reduce_block_n),
        dict(num_warps=norm.DEFAULT_LAUNCH.reduce_warps, divisible=NORM_DIVISIBLE, ptxas=True),
    )
    return cases


CASES.update(_norm_cases())

# bias + GELU at the H100 launch configuration (engine/kernels/gelu.py), with the same launch specialisation
GELU_DIVISIBLE = ("H", "B", "Y", "DY", "DH", "DB_PART", "N", "stride_h", "stride_y", "stride_dy", "stride_dh")
CASES["bias_gelu_fwd"] = (
    gelu._bias_gelu_fwd_kernel,
    dict(H=BF16, B=F32, Y=BF16),
    dict(BLOCK_M=gelu.FWD_TILE // gelu.MAX_BLOCK_N, BLOCK_N=gelu.MAX_BLOCK_N),
    dict(num_warps=gelu.NUM_WARPS, divisible=GELU_DIVISIBLE, ptxas=True),
)
# rotary embedding on the packed projection, head_dim 128 (64 pairs), as engine/kernels/rope.py launches it
CASES["rope_packed"] = (
    rope._rope_kernel,
    dict(X=BF16, Y=BF16, COS=F32, SIN=F32, sign="fp32"),
    dict(BLOCK_R=16, BLOCK_H=64),
    dict(num_warps=8, divisible=("X", "Y", "COS", "SIN", "stride_x", "stride_y", "stride_t"), ptxas=True),
)
# SwiGLU at the H100 launch configuration (engine/kernels/glu.py)
SWIGLU_DIVISIBLE = ("X", "Y", "DY", "DX", "F", "stride_x", "stride_y", "stride_dy", "stride_dx")
SWIGLU_BLOCKS = dict(BLOCK_M=glu.TILE // glu.MAX_BLOCK_N, BLOCK_N=glu.MAX_BLOCK_N)
CASES["swiglu_fwd"] = (
    glu._swiglu_fwd_kernel, dict(X=BF16, Y=BF16), SWIGLU_BLOCKS,
    dict(num_warps=glu.NUM_WARPS, divisible=SWIGLU_DIVISIBLE, ptxas=True),
)  # fmt: skip
CASES["swiglu_bwd"] = (
    glu._swiglu_bwd_kernel, dict(DY=BF16, X=BF16, DX=BF16), SWIGLU_BLOCKS,
    dict(num_warps=glu.NUM_WARPS, divisible=SWIGLU_DIVISIBLE, ptxas=True),
)  # fmt: skip
CASES["bias_gelu_bwd"] = (
    gelu._bias_gelu_bwd_kernel,
    dict(DY=BF16, H=BF16, B=F32, DH=BF16, DB_PART=F32),
    dict(HAS_DBIAS=True, BLOCK_M=gelu.BWD_TILE // gelu.MAX_BLOCK_N, BLOCK_N=gelu.MAX_BLOCK_N, STAGES=gelu.BWD_STAGES),
    dict(num_warps=gelu.NUM_WARPS, divisible=GELU_DIVISIBLE, ptxas=True),
)


def ptxas_resources(ptx: str) -> dict:
    """Registers and spill bytes ptxas reports for the PTX (the ptxas and flags Triton uses); -1 if missing."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run(
            [get_ptxas(90).path, "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(90)}", src,
             "-o", os.path.join(tmp, "kernel.o")],
            capture_output=True, text=True,
        )  # fmt: skip
    log = proc.stdout + proc.stderr

    def number(pattern: str) -> int:
        found = re.search(pattern, log)
        return int(found.group(1)) if found else -1

    return {
        "regs": number(r"Used (\d+) registers"),
        "spill_stores": number(r"(\d+) bytes spill stores"),
        "spill_loads": number(r"(\d+) bytes spill loads"),
        **({"ptxas_error": log[-500:]} if proc.returncode else {}),
    }


def compile_case(name: str) -> dict:
    # an optional 4th entry: num_warps (default 4), maxnreg, divisible (argument names specialised as
    # multiples of 16) and ptxas (report registers and spills)
    kernel, types, constexprs, *extra = CASES[name]
    launch = extra[0] if extra else {}
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    signature = {a: "constexpr" if a in constexprs else types.get(a, "i32") for a in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
             if a in launch.get("divisible", ()) and a not in constexprs}  # fmt: skip
    src = ASTSource(fn, signature, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()}, attrs=attrs)
    options = {"num_warps": launch.get("num_warps", 4)}
    if launch.get("maxnreg"):
        options["maxnreg"] = launch["maxnreg"]
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    except Exception as err:  # reported to the test, which fails with the message
        return {"name": name, "ok": False, "error": f"{type(err).__name__}: {err}"[:2000]}
    ptx, cubin = compiled.asm.get("ptx", ""), compiled.asm.get("cubin", b"")
    result = {"name": name, "ok": ".target sm_90" in ptx and len(cubin) > 0, "error": ""}
    if launch.get("ptxas"):
        result.update(options, **ptxas_resources(ptx), smem=compiled.metadata.shared)
    return result


if __name__ == "__main__":
    for case in CASES:
        print(json.dumps(compile_case(case)), flush=True)
