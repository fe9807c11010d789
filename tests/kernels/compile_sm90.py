"""Compile every kernel for an H100 (sm_90) without a GPU; prints one JSON line of results per kernel.

Run by test_kernels_compile.py in a fresh process: Triton fixes compiled-vs-interpreted at import, and
the kernel tests import it interpreted. Usage: ``python tests/kernels/compile_sm90.py`` from the repo root.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.getcwd())
os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels import adamw, attention_bwd, attention_fwd, chunked_cross_entropy, norm  # noqa: E402

BF16 = "*bf16"
F32 = "*fp32"
ATTN = dict(
    CAUSAL=True, HAS_ALIBI=True, DOT_PRECISION="tf32", UPCAST_DOT=False, BLOCK_D=64, BLOCK_M=64, BLOCK_N=64
)
CASES = {
    "norm_fwd": (
        norm._norm_fwd_kernel,
        dict(X=BF16, Y=BF16, W=F32, B=F32, MEAN=F32, RSTD=F32, eps="fp32"),
        dict(IS_RMS=False, HAS_BIAS=True, BLOCK_N=1024, SINGLE=True),
    ),
    "norm_bwd": (
        norm._norm_bwd_kernel,
        dict(X=BF16, DY=BF16, DX=BF16, W=F32, MEAN=F32, RSTD=F32, DW_PART=F32, DB_PART=F32),
        dict(IS_RMS=True, HAS_BIAS=False, BLOCK_N=1024, SINGLE=True, STAGES=norm.BWD_STAGES),
    ),
    "norm_bwd_chunked": (
        norm._norm_bwd_kernel,
        dict(X=BF16, DY=BF16, DX=BF16, W=F32, MEAN=F32, RSTD=F32, DW_PART=F32, DB_PART=F32),
        dict(IS_RMS=False, HAS_BIAS=True, BLOCK_N=1024, SINGLE=False, STAGES=1),
    ),
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
}


def compile_case(name: str) -> dict:
    kernel, types, constexprs = CASES[name]
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    signature = {a: "constexpr" if a in constexprs else types.get(a, "i32") for a in fn.arg_names}
    src = ASTSource(fn, signature, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    except Exception as err:  # reported to the test, which fails with the message
        return {"name": name, "ok": False, "error": f"{type(err).__name__}: {err}"[:2000]}
    ptx, cubin = compiled.asm.get("ptx", ""), compiled.asm.get("cubin", b"")
    return {"name": name, "ok": ".target sm_90" in ptx and len(cubin) > 0, "error": ""}


if __name__ == "__main__":
    for case in CASES:
        print(json.dumps(compile_case(case)), flush=True)
