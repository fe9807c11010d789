"""Plain-torch references for every kernel: the CPU path and the ground truth of the tests.

Each computes in fp32 and returns the input's dtype, as the kernels do, and is differentiable by
torch autograd (except the in-place optimizer step).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float = 1e-5) -> torch.Tensor:
    # x (..., H); statistics in fp32 whatever the input dtype
    b = None if bias is None else bias.float()
    y = F.layer_norm(x.float(), (x.shape[-1],), weight.float(), b, eps)
    return y.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (xf * rstd * weight.float()).to(x.dtype)


def add_layer_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + residual, layer_norm(x + residual)), the sum in x's dtype."""
    total = x + residual
    return total, layer_norm(total, weight, bias, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + residual, rms_norm(x + residual)), the sum in x's dtype."""
    total = x + residual
    return total, rms_norm(total, weight, eps)


def bias_gelu(h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(h + bias) in fp32, returned in h's dtype; h (..., N), bias (N,).

    h + bias is not rounded to h's dtype before the GELU (unfused, F.linear's bias add rounds it once
    more): this is the fused kernel's semantics. Its autograd gives dh = dy * gelu'(h + bias) rounded
    to h's dtype, and dbias = the fp32 column sum of the unrounded dh, in bias's dtype.
    """
    return F.gelu(h.float() + bias.float(), approximate="tanh").to(h.dtype)


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for x (..., 2F) = [gate | up], in fp32, returned in x's dtype (one rounding)."""
    gate, up = x.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)


def rope_packed(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int, kv_heads: int) -> torch.Tensor:
    """Rotary embedding on the query and key heads of a packed (S, B, (n_heads + 2 kv_heads) * D) projection,
    interleaved pairs (x[2i], x[2i+1]) rotated by the (S, D/2) angles' cos/sin; value heads unchanged.
    fp32 math, one rounding to qkv's dtype."""
    seq, heads = qkv.shape[0], n_heads + 2 * kv_heads
    x = qkv.float().unflatten(-1, (heads, -1, 2))  # (S, B, heads, D/2, 2)
    c, s = cos[:seq, None, None, :].float(), sin[:seq, None, None, :].float()
    even, odd = x[..., 0], x[..., 1]
    rotated = torch.stack((even * c - odd * s, even * s + odd * c), dim=-1)
    out = torch.cat((rotated[:, :, : n_heads + kv_heads], x[:, :, n_heads + kv_heads :]), dim=2)
    return out.flatten(2).to(qkv.dtype)


def alibi_bias(slopes: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(H, S, S) ALiBi bias ``-slope * |i - j|`` (FlashAttention's convention; causal keeps j <= i)."""
    pos = torch.arange(seq_len, device=slopes.device, dtype=torch.float32)
    dist = (pos[:, None] - pos[None, :]).abs()  # (S, S)
    return -slopes.float()[:, None, None] * dist


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Explicit softmax(Q K^T * scale + bias + mask) V in fp32; q (B, H, S, D), k/v (B, Hkv, S, D)."""
    _, heads, seq, dim = q.shape
    group = heads // k.shape[1]
    scale = 1.0 / math.sqrt(dim) if softmax_scale is None else softmax_scale
    kf = k.float().repeat_interleave(group, dim=1)  # (B, H, S, D): query head h reads kv head h // group
    vf = v.float().repeat_interleave(group, dim=1)
    scores = torch.matmul(q.float(), kf.transpose(-1, -2)) * scale  # (B, H, S, S)
    if alibi_slopes is not None:
        scores = scores + alibi_bias(alibi_slopes, seq)
    if causal:
        mask = torch.ones(seq, seq, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), vf).to(q.dtype)


def cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int = -100, reduction: str = "mean"
) -> torch.Tensor:
    # logits (..., V) -> fp32 loss; the gradient flows back in the logits' dtype
    flat = logits.reshape(-1, logits.shape[-1]).float()
    loss = F.cross_entropy(flat, target.reshape(-1), ignore_index=ignore_index, reduction=reduction)
    return loss if reduction != "none" else loss.view(target.shape)


def vocab_parallel_stats(
    logits_shard: torch.Tensor, target: torch.Tensor, *, vocab_start: int, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of a (N, V_shard) shard: (local max, sum exp(x - local max), target logit or 0), fp32."""
    x = logits_shard.float()
    local_max = x.max(dim=-1).values
    sumexp = torch.exp(x - local_max[:, None]).sum(dim=-1)
    local = target - vocab_start
    inside = (local >= 0) & (local < x.shape[-1]) & (target != ignore_index)
    picked = x.gather(1, local.clamp(0, x.shape[-1] - 1)[:, None]).squeeze(1)
    return local_max, sumexp, torch.where(inside, picked, torch.zeros_like(picked))


def vocab_parallel_grad(
    logits_shard: torch.Tensor,
    target: torch.Tensor,
    lse: torch.Tensor,
    dloss: torch.Tensor,
    *,
    vocab_start: int,
    ignore_index: int = -100,
) -> torch.Tensor:
    """d loss / d shard = (softmax - onehot) * dloss per row, zero on ignored rows; shard's dtype."""
    x = logits_shard.float()
    prob = torch.exp(x - lse[:, None])
    cols = torch.arange(x.shape[-1], device=x.device) + vocab_start
    onehot = (cols[None, :] == target[:, None]).float()
    keep = (target != ignore_index).float() * dloss.float()
    return ((prob - onehot) * keep[:, None]).to(logits_shard.dtype)


def adamw_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    grad_scale: float = 1.0,
    out: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    check_finite: bool = True,
) -> torch.Tensor:
    """torch.optim.AdamW's single-tensor math on flat fp32 tensors; skipped when any grad is non-finite
    (``check_finite``) or ``found_inf`` is raised."""
    g = grad.float() * (1.0 / grad_scale)
    flag = torch.zeros(1, dtype=torch.float32, device=param.device) if found_inf is None else found_inf
    if check_finite:
        flag.copy_(torch.maximum(flag, (~torch.isfinite(g)).any().float().reshape(1)))
    if flag.item() > 0:
        return flag
    param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = math.sqrt(1 - beta2**step)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
    if out is not None:
        out.copy_(param)
    return flag
