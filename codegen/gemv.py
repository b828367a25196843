"""Matrix-vector product for one-token decode: y = x @ W.T (+ bias), x one row of K, W (N, K) row-major.

At batch 1 a decode step is a chain of GEMVs, each streaming a weight matrix from HBM once. cuBLAS's GEMV
reached 33-80 % of copy bandwidth on llama-1b-like's layer weights (8-46 MB) and 90 % on the lm_head (H200,
2026-11-21, every call on a different weight as in a real step: `python benchmarks/gemv_sizes.py`).
The short matrices pay for cuBLAS's ramp-up; this kernel keeps every SM loading from the first cycle.

Each program owns BLOCK_N rows of W and walks K in BLOCK_K-wide chunks: one (BLOCK_N, BLOCK_K) load of W
per step, multiplied by the matching chunk of x (read from L2 by every program), summed into a register
tile in fp32, reduced over K once at the end. No split-K: N / BLOCK_N programs already fill the GPU at
these sizes, and a split would need a second pass or atomics.

    fxopt::gemv(x, weight, bias?, residual?, norm_weight?, eps, glu, norm_bias?, layer_norm, act, residual2?)
        -> (..., N)
        x (..., K) with one row; N / 2 outputs with glu. Optional prologue: RMSNorm of x times norm_weight, or
        with layer_norm LayerNorm of x times norm_weight plus norm_bias. Optional epilogues, in this order:
        + bias, silu(gate) * up over W's two halves (glu), act ("gelu_tanh": GPT-2's GELU, "gelu": the erf
        one), + residual, + residual2 (a parallel-residual block's mlp + attn + x, each sum rounded as eager's).
        On CPU: the same eager ops.

    fxopt::gemv_qkv(x, weight, bias?, norm_weight?, eps, cos?, sin?, k_cache, v_cache, pos, norm_bias?,
                    layer_norm, q_norm_weight?, k_norm_weight?, qk_eps) -> q
        the attention input projection of a decode step: the GEMV (with the same norm prologues), then the split
        into heads, per-head RMSNorm of q and k (Qwen3), RoPE on q and k and the writes of k and v into the
        caches at slot pos, in the same kernel (a second, per-head one with the q/k norms).

The decode pass (passes/matmul.DECODE_RULES) folds a layer's norms, SwiGLU product or GELU, residual adds, RoPE
and cache writes into its GEMVs, so a Llama or GPT-2 layer's decode step is 4 GEMVs and one attention kernel.
On Hopper each GEMV is launched with programmatic dependent launch: it starts streaming its weights while the
previous kernel ends.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fxopt import config
from fxopt.codegen import library
from fxopt.codegen.loader import ops_use_kernels
from fxopt.codegen.pdl import launch_options, use_pdl
from fxopt.codegen.rope import cache_slots, result_dtype, rope_reference
from fxopt.codegen.tuning import TunedKernel

_INTERPRET = config.get("interpret")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INTERPRET_BF16_FIX = tl.constexpr(_INTERPRET)


@triton.jit
def _load_w(w_rows, k, row_ok, K, EVEN_K: tl.constexpr):
    """A (BLOCK_N, BLOCK_K) chunk of W rows, streamed (W is read once per step: do not keep it in L2)."""
    if EVEN_K:
        return tl.load(w_rows + k[None, :], mask=row_ok[:, None], other=0.0, eviction_policy="evict_first")
    return tl.load(w_rows + k[None, :], mask=row_ok[:, None] & (k < K)[None, :], other=0.0,
                   eviction_policy="evict_first")


@triton.jit
def _round(v, like_ptr):
    """v rounded to like_ptr's element type, back in fp32: what eager's intermediate tensors hold."""
    if INTERPRET_BF16_FIX and like_ptr.dtype.element_ty == tl.bfloat16:
        # the interpreter truncates fp32 -> bf16 where GPUs round to nearest even: round here (then exact)
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        v = tl.where(v != v, v, bits.to(tl.float32, bitcast=True))
    return v.to(like_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def _load_x(x_ptr, g_ptr, nb_ptr, k, K, mean, rstd, NORM: tl.constexpr, LAYER: tl.constexpr,
            NORM_BIAS: tl.constexpr, EVEN_K: tl.constexpr):
    """A chunk of the GEMV's input x (fp32), and the vector the product reads: x * g for RMSNorm (rstd is
    applied after the sweep), LayerNorm(x) * g + b with LAYER (rounded to x's dtype, as eager's tensor holds
    it), else x again."""
    if EVEN_K:
        x = tl.load(x_ptr + k).to(tl.float32)
    else:
        x = tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32)
    xg = x
    if NORM:
        g = tl.load(g_ptr + k, mask=k < K, other=0.0).to(tl.float32)
        if LAYER:
            xg = (x - mean) * rstd * g
            if NORM_BIAS:
                xg += tl.load(nb_ptr + k, mask=k < K, other=0.0).to(tl.float32)
            xg = tl.where(k < K, _round(xg, x_ptr), 0.0)
        else:
            xg = x * g
    return x, xg


@triton.jit
def _row_stats(x_ptr, K, eps, BLOCK_K: tl.constexpr):
    """(mean, 1 / sqrt(var + eps)) of x's K elements in fp32, var biased as LayerNorm's. One pass of sums of
    d = x - c, c the first chunk's mean: exact for any c, and free of the cancellation of E[x²] - E[x]² when
    |mean| >> std. x (K elements) comes from L2: every program reads it once more than without the norm."""
    cols = tl.arange(0, BLOCK_K)  # (BLOCK_K,)
    x = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
    c = tl.sum(x, axis=0) / tl.minimum(K, BLOCK_K)
    d = tl.where(cols < K, x - c, 0.0)
    s1 = d
    s2 = d * d
    for k0 in range(BLOCK_K, K, BLOCK_K):
        k = k0 + cols
        d = tl.where(k < K, tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32) - c, 0.0)
        s1 += d
        s2 += d * d
    m = tl.sum(s1, axis=0) / K
    var = tl.maximum(tl.sum(s2, axis=0) / K - m * m, 0.0)
    return c + m, tl.rsqrt(var + eps)


@triton.jit
def _products(x_ptr, g_ptr, nb_ptr, w_rows, u_rows, row_ok, K, eps,
              NORM: tl.constexpr, LAYER: tl.constexpr, NORM_BIAS: tl.constexpr, PAIRED: tl.constexpr,
              PDL: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """(W[rows] · x, W[u_rows] · x) in fp32 for one program's rows, x normalised first with NORM (RMSNorm, or
    LayerNorm with LAYER); the second is the first again unless PAIRED. The bulk of the kernel: W's rows are
    read once, x from L2.

    RMSNorm(x) * g = rstd * (g * x) with one rstd for the whole row, so W · RMSNorm(x) = rstd * (W · (g * x)):
    the sum of squares is gathered in the same pass over x and applied once at the end. (Eager rounds
    x * rstd and g * that to the model's dtype before the matmul; skipping those roundings is closer to the
    exact result, and saves every program a dependent pass over x before its first product.)
    LayerNorm subtracts the mean before the product (factoring it out, W · x - mean * (W · 1), would cancel
    badly when |mean| >> std), so its mean and variance take a pass over x before the sweep, and the
    normalised chunks are rounded as eager's LayerNorm output is."""
    cols = tl.arange(0, BLOCK_K)
    # W is a constant: its first chunk is requested before waiting for the kernel that produces x
    w = _load_w(w_rows, cols, row_ok, K, EVEN_K)  # (BLOCK_N, BLOCK_K)
    if PAIRED:
        u = _load_w(u_rows, cols, row_ok, K, EVEN_K)
    if PDL:  # launched early (programmatic dependent launch): let the next kernel launch, wait for x
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    mean = 0.0
    rstd = 1.0
    if NORM and LAYER:
        mean, rstd = _row_stats(x_ptr, K, eps, BLOCK_K)
    x, xg = _load_x(x_ptr, g_ptr, nb_ptr, cols, K, mean, rstd, NORM, LAYER, NORM_BIAS, EVEN_K)
    squares = x * x  # (BLOCK_K,), used with RMSNorm
    acc = w.to(tl.float32) * xg[None, :]  # (BLOCK_N, BLOCK_K)
    acc_u = acc
    if PAIRED:
        acc_u = u.to(tl.float32) * xg[None, :]
    for k0 in range(BLOCK_K, K, BLOCK_K):
        k = k0 + cols
        x, xg = _load_x(x_ptr, g_ptr, nb_ptr, k, K, mean, rstd, NORM, LAYER, NORM_BIAS, EVEN_K)
        if NORM and not LAYER:
            squares += x * x
        acc += _load_w(w_rows, k, row_ok, K, EVEN_K).to(tl.float32) * xg[None, :]
        if PAIRED:
            acc_u += _load_w(u_rows, k, row_ok, K, EVEN_K).to(tl.float32) * xg[None, :]
    y = tl.sum(acc, axis=1)  # (BLOCK_N,)
    y_u = y
    if PAIRED:
        y_u = tl.sum(acc_u, axis=1)
    if NORM and not LAYER:
        rstd = tl.rsqrt(tl.sum(squares, axis=0) / K + eps)
        y = y * rstd
        y_u = y_u * rstd
    return y, y_u


ACTS = {"none": 0, "gelu_tanh": 1, "gelu": 2}  # the activation epilogues: act -> the kernel's ACT


@triton.jit
def _activation(y, ACT: tl.constexpr):
    """GELU of y (fp32): ACT 1 the tanh approximation, y/2 * (1 + tanh(u)) = y * sigmoid(2u) with
    u = sqrt(2/pi) * (y + 0.044715 y³) (the sigmoid form has no cancellation for negative y); 2 the erf one."""
    if ACT == 1:
        out = y * tl.sigmoid(1.5957691216057308 * (y + 0.044715 * y * y * y))
    else:
        out = 0.5 * y * (1.0 + tl.erf(y * 0.7071067811865476))
    return out


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, bias_ptr, res_ptr, g_ptr, nb_ptr, y_ptr, N, K, stride_wn, up_row, eps, res2_ptr,
                 HAS_BIAS: tl.constexpr, RESIDUAL: tl.constexpr, NORM: tl.constexpr, LAYER: tl.constexpr,
                 NORM_BIAS: tl.constexpr, GLU: tl.constexpr, ACT: tl.constexpr, PDL: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, RESIDUAL2: tl.constexpr = False):
    # One program: BLOCK_N outputs (BLOCK_N rows of W; with GLU also the BLOCK_N "up" rows up_row further).
    # Reads those rows of W once (the bulk), x (and g, the norm bias) from L2 (x twice with LayerNorm),
    # writes BLOCK_N outputs.
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    row_ok = rows < N
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_wn  # (BLOCK_N, 1)
    u_rows = w_rows + up_row.to(tl.int64) * stride_wn
    y, up = _products(x_ptr, g_ptr, nb_ptr, w_rows, u_rows, row_ok, K, eps, NORM, LAYER, NORM_BIAS, GLU, PDL,
                      BLOCK_K, EVEN_K)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    y = _round(y, y_ptr)
    if GLU:  # silu(gate) * up, each rounded as eager's bf16 tensors are
        up = _round(up, y_ptr)
        y = _round(_round(y * tl.sigmoid(y), y_ptr) * up, y_ptr)
    if ACT != 0:  # GELU of the rounded projection, itself rounded: eager's two tensors
        y = _round(_activation(y, ACT), y_ptr)
    if RESIDUAL:
        y += tl.load(res_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    if RESIDUAL2:  # the first sum rounded, as eager's tensor holds it, then the second
        y = _round(y, y_ptr) + tl.load(res2_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, _round(y, y_ptr).to(y_ptr.dtype.element_ty), mask=row_ok)


def default_config(n: int, k: int, glu: bool = False) -> triton.Config:
    """2 rows of W per program in 1024-column chunks up to K = 4096, 4 rows in 2048-column chunks beyond, on
    4 warps: the tuned pick (or within 1 %) at every llama-1b-like size (H200, 2026-11-21, gemv_sizes.py).
    With GLU a program reads a gate and an up row per output: 1 output row keeps 2 rows of W per program."""
    if _INTERPRET:
        return triton.Config({"BLOCK_N": 4, "BLOCK_K": 32}, num_warps=4)
    block_n, block_k = (2, 1024) if k <= 4096 else (4, 2048)
    return triton.Config({"BLOCK_N": block_n // 2 if glu else block_n,
                          "BLOCK_K": min(block_k, triton.next_power_of_2(k))}, num_warps=4)


# the tiles FXOPT_GEMV_AUTOTUNE=1 times beside the default (BLOCK_K up to K's power of two, at least 512)
TUNING_SPACE = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w)
                for bn in (1, 2, 4, 8) for bk in (512, 1024, 2048) for w in (4, 8)]


def tuning_configs(n: int, k: int) -> list[triton.Config]:
    kmax = max(triton.next_power_of_2(k), 512)
    return [c for c in TUNING_SPACE if c.kwargs["BLOCK_K"] <= kmax]


def _tile(c: triton.Config) -> tuple:
    return c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps


def _with_even_k(c: triton.Config, k: int) -> triton.Config:
    return triton.Config({**c.kwargs, "EVEN_K": k % c.kwargs["BLOCK_K"] == 0}, num_warps=c.num_warps)


def _gemv_candidates(k: int, glu: bool) -> list[triton.Config]:
    """The default tile first, then the tuning space's tiles for K, each with its EVEN_K flag."""
    first = default_config(0, k, glu)
    rest = [c for c in tuning_configs(0, k) if _tile(c) != _tile(first)]
    return [_with_even_k(c, k) for c in (first, *rest)]


def _prune_gemv(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    return _gemv_candidates(args["K"], args["GLU"])


def _prune_gemv_qkv(configs, named_args, **kwargs):
    return _gemv_candidates({**named_args, **kwargs}["K"], True)  # two rows of W per pair, as with GLU


_FLAGS = ["HAS_BIAS", "NORM", "LAYER", "NORM_BIAS"]
_gemv_tuned = TunedKernel(_gemv_kernel, TUNING_SPACE, key=["N", "K", *_FLAGS, "RESIDUAL", "GLU", "ACT", "RESIDUAL2"],
                          prune=_prune_gemv, family="gemv", tune="gemv_autotune")


@dataclass(frozen=True)
class Folded:
    """What the kernel folds around the product: a bias; before it RMSNorm of x times norm_weight, or with
    layer_norm LayerNorm of x times norm_weight plus norm_bias; after it the gate/up SwiGLU product (W holds
    the gate rows, then as many up rows), an activation (`act`, one of ACTS) and one or two residual adds."""

    bias: torch.Tensor | None = None
    residual: torch.Tensor | None = None
    norm_weight: torch.Tensor | None = None
    eps: float = 0.0
    glu: bool = False
    norm_bias: torch.Tensor | None = None
    layer_norm: bool = False
    act: str = "none"
    q_norm_weight: torch.Tensor | None = None  # gemv_qkv only: per-head RMSNorm of q and k over d (Qwen3)
    k_norm_weight: torch.Tensor | None = None
    qk_eps: float = 0.0
    heads_interleaved: bool = False  # gemv_qkv only: W's rows grouped per KV head as [q heads; k; v] (GPT-NeoX,
    # Falcon's new decoder architecture)
    rope_adjacent: bool = False  # gemv_qkv only: RoPE pairs columns (2i, 2i + 1), GPT-J's rotate_every_two
    residual2: torch.Tensor | None = None  # added after residual (GPT-NeoX, Phi: mlp + attn + x)


def _launch(x, w, y, config: triton.Config | None, ep: Folded = Folded()) -> None:
    """y = the folded product of one row x with w; `config` bypasses the tuner (benchmarks/gemv_sizes.py)."""
    n_out, k = y.numel(), w.shape[1]
    pdl = use_pdl(x.device)  # weights stream while the previous kernel ends (codegen/pdl.py)
    if config is None:
        kernel, tile = _gemv_tuned, {}
    else:
        kernel, tile = _gemv_kernel, dict(_with_even_k(config, k).all_kwargs())
    kernel[lambda meta: (triton.cdiv(n_out, meta["BLOCK_N"]),)](
        x, w, _or(ep.bias, y), _or(ep.residual, y), _or(ep.norm_weight, y), _or(ep.norm_bias, y), y, n_out, k,
        w.stride(0), n_out if ep.glu else 0, ep.eps, _or(ep.residual2, y),
        HAS_BIAS=ep.bias is not None, RESIDUAL=ep.residual is not None, NORM=ep.norm_weight is not None,
        LAYER=ep.layer_norm, NORM_BIAS=ep.norm_bias is not None, GLU=ep.glu, ACT=ACTS[ep.act], PDL=pdl,
        RESIDUAL2=ep.residual2 is not None, **tile, **launch_options(pdl))


def _or(tensor, placeholder):
    return tensor if tensor is not None else placeholder


def _is_vector(t: torch.Tensor | None, size: int, dtype: torch.dtype) -> bool:
    return t is None or (t.numel() == size and t.dtype == dtype and t.is_contiguous())


def supports(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, ep: Folded = Folded()
             ) -> str | None:
    """None when the kernel covers the call, else why not."""
    if x.numel() != x.shape[-1]:
        return "more than one row"
    if ep.q_norm_weight is not None or ep.k_norm_weight is not None or ep.heads_interleaved or ep.rope_adjacent:
        return "a per-head q/k norm or interleaved heads (gemv_qkv's, not one GEMV's)"
    if w.dim() != 2 or w.stride(1) != 1 or x.shape[-1] != w.shape[1]:
        return "weight is not a row-major (N, K) matrix"
    if w.dtype not in DTYPES or x.dtype != w.dtype:
        return "dtypes"
    n_out = w.shape[0] // 2 if ep.glu else w.shape[0]
    if ep.glu and w.shape[0] % 2:
        return "a gate/up weight with an odd number of rows"
    if ep.glu and bias is not None:
        return "gate/up with a bias"
    if not _is_vector(bias, w.shape[0], w.dtype):
        return "bias is not a contiguous vector of the weight's dtype"
    if not _is_vector(ep.residual, n_out, w.dtype) or not _is_vector(ep.norm_weight, w.shape[1], w.dtype) \
            or not _is_vector(ep.residual2, n_out, w.dtype):
        return "residual or norm weight is not a contiguous vector of the weight's dtype"
    if ep.residual2 is not None and ep.residual is None:
        return "a second residual without a first"
    return _supports_norm(w, ep) or (None if ep.act in ACTS else f"activation {ep.act!r}")


def _supports_norm(w: torch.Tensor, ep: Folded) -> str | None:
    """Why the kernel cannot take ep's norm prologue (the part gemv and gemv_qkv share), or None."""
    if ep.layer_norm and ep.norm_weight is None:
        return "a LayerNorm without a weight"
    if ep.norm_bias is not None and not ep.layer_norm:
        return "a norm bias without LayerNorm"
    if not _is_vector(ep.norm_bias, w.shape[1], w.dtype):
        return "norm bias is not a contiguous vector of the weight's dtype"
    return None


def gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, ep: Folded | None = None
         ) -> torch.Tensor:
    """x @ w.T (+ bias), with `ep`'s prologue / epilogues, through the kernel (x: one row of K)."""
    ep = replace(ep or Folded(), bias=bias)
    n_out = w.shape[0] // 2 if ep.glu else w.shape[0]
    x_row = x.reshape(-1).contiguous()  # (K,)
    y = torch.empty(n_out, device=x.device, dtype=x.dtype)  # (N,)
    _launch(x_row, w, y, None, ep)
    return y.reshape(*x.shape[:-1], n_out)


def gemv_reference(x, w, bias=None, ep: Folded = Folded()) -> torch.Tensor:
    """The eager ops the fused kernel replaces, in their order and dtypes (LlamaRMSNorm or LayerNorm, linear,
    SwiGLU or GELU, +)."""
    x = norm_reference(x, ep)
    y = F.linear(x, w, bias)
    if ep.glu:
        gate, up = y.chunk(2, dim=-1)
        y = F.silu(gate) * up
    if ep.act != "none":
        y = F.gelu(y, approximate="tanh" if ep.act == "gelu_tanh" else "none")
    if ep.residual is not None:
        y = ep.residual.reshape(y.shape) + y
    if ep.residual2 is not None:
        y = y + ep.residual2.reshape(y.shape)
    return y


def norm_reference(x: torch.Tensor, ep: Folded) -> torch.Tensor:
    """x through ep's norm prologue as eager computes it: LlamaRMSNorm (fp32 inside, the normalised row rounded
    to x's dtype, then times the weight), or F.layer_norm over the last dim; x itself without one."""
    if ep.norm_weight is None:
        return x
    if ep.layer_norm:
        return F.layer_norm(x, x.shape[-1:], ep.norm_weight, ep.norm_bias, ep.eps)
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + ep.eps)
    x = ep.norm_weight * normed.to(x.dtype)
    return x if ep.norm_bias is None else x + ep.norm_bias


@library.define("gemv")
def gemv_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            residual: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None, eps: float = 0.0,
            glu: bool = False, norm_bias: torch.Tensor | None = None, layer_norm: bool = False,
            act: str = "none", residual2: torch.Tensor | None = None) -> torch.Tensor:
    ep = Folded(bias, residual, norm_weight, eps, glu, norm_bias, layer_norm, act, residual2=residual2)
    if ops_use_kernels(x) and supports(x, weight, bias, ep) is None:
        return gemv(x, weight, bias, ep)
    return gemv_reference(x, weight, bias, ep)


@library.register_fake(gemv_op)
def _(x, weight, bias, residual=None, norm_weight=None, eps=0.0, glu=False, norm_bias=None, layer_norm=False,
      act="none", residual2=None):
    return x.new_empty(x.shape[:-1] + (weight.shape[0] // 2 if glu else weight.shape[0],))


# --------------------------------------------------------------------------------------------------
# The attention block's input projection, with what follows it in a decode step folded in:
#
#     fxopt::gemv_qkv(x, weight, bias?, norm_weight?, eps, cos?, sin?, k_cache, v_cache, pos, norm_bias?,
#                     layer_norm, q_norm_weight?, k_norm_weight?, qk_eps, interleaved, adjacent) -> q
#         y = gemv(x, [W_q; W_k; W_v]) with the RMSNorm or LayerNorm prologue; q, k, v = y split into heads of d
#         (with `interleaved`, W's rows are grouped per KV head as [its q heads; k; v]: GPT-NeoX's
#         query_key_value with one q head a group, Falcon's new decoder architecture with several);
#         q and k each times its norm weight after RMSNorm over d when given; q, k rotated by RoPE (cos, sin:
#         the step's one row of r <= d columns; r < d is partial rotary, the other columns pass; `adjacent`:
#         GPT-J's pairs (2i, 2i + 1)) when given;
#         k_cache[:, :, pos] = k and v_cache[:, :, pos] = v in place; returns q (1, q_heads, 1, d).
#
# Traced, that is a GEMV, three slices, three head transposes, RoPE on q, RoPE + cache write on k and the
# cache write of v: four kernels per layer and a round trip of q/k/v through HBM. Here each program owns
# pairs of W's rows (j, j + r/2) of one head, the two columns RoPE mixes, so it can rotate them itself (with
# partial rotary the d - r unrotated columns are paired the same way and pass through).
# Heads and head_dim come from the caches: (b, kv_heads, max_len, d); q_heads = rows / d - 2 * kv_heads.
# With per-head q/k RMSNorm (Qwen3) a program would need a whole head, leaving most SMs idle for the bulk:
# there the GEMV runs over every program as a plain one and _qkv_heads_kernel (one program per head, a few
# hundred bytes each) normalises, rotates and writes: two kernels instead of the six the graph traces.
# --------------------------------------------------------------------------------------------------


@triton.jit
def _gemv_qkv_kernel(x_ptr, w_ptr, bias_ptr, g_ptr, nb_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, pos_ptr,
                     K, stride_wn, eps, q_heads, kv_heads, s_cos, s_sin, s_kh, s_ks, s_kd, s_vh, s_vs, s_vd,
                     HAS_BIAS: tl.constexpr, NORM: tl.constexpr, LAYER: tl.constexpr, NORM_BIAS: tl.constexpr,
                     ROPE: tl.constexpr, PDL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, ROT: tl.constexpr, INTERLEAVED: tl.constexpr,
                     ADJACENT: tl.constexpr = False):
    # One program: BLOCK_N column pairs (lo, hi) of heads (_pair_columns), i.e. 2 * BLOCK_N rows of W.
    HALF: tl.constexpr = HEAD_DIM // 2
    pairs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    pair_ok = pairs < (q_heads + 2 * kv_heads) * HALF
    head = pairs // HALF
    j = pairs % HALF  # the pair within its head
    c_lo, c_hi = _pair_columns(j, HEAD_DIM, ROT, ADJACENT)
    base = _head_row(head, q_heads, kv_heads, HEAD_DIM, INTERLEAVED)
    lo, hi = base + c_lo, base + c_hi  # (BLOCK_N,) rows of W
    w_lo = w_ptr + lo.to(tl.int64)[:, None] * stride_wn  # (BLOCK_N, 1)
    w_hi = w_ptr + hi.to(tl.int64)[:, None] * stride_wn
    y_lo, y_hi = _products(x_ptr, g_ptr, nb_ptr, w_lo, w_hi, pair_ok, K, eps, NORM, LAYER, NORM_BIAS, True, PDL,
                           BLOCK_K, EVEN_K)
    if HAS_BIAS:
        y_lo += tl.load(bias_ptr + lo, mask=pair_ok, other=0.0).to(tl.float32)
        y_hi += tl.load(bias_ptr + hi, mask=pair_ok, other=0.0).to(tl.float32)
    y_lo = _round(y_lo, x_ptr)  # the projection's output, as eager's tensor holds it
    y_hi = _round(y_hi, x_ptr)
    _heads_epilogue(y_lo, y_hi, head, j, c_lo, c_hi, pair_ok, x_ptr, x_ptr, x_ptr, 0.0, cos_ptr, sin_ptr, q_ptr,
                    k_ptr, v_ptr, pos_ptr, q_heads, kv_heads, s_cos, s_sin, s_kh, s_ks, s_kd, s_vh, s_vs, s_vd, ROPE,
                    False, HEAD_DIM, ROT)


@triton.jit
def _pair_columns(j, HEAD_DIM: tl.constexpr, ROT: tl.constexpr, ADJACENT: tl.constexpr = False):
    # The two columns of a head that pair j owns: RoPE's (j, j + ROT/2) for j < ROT/2 (with ADJACENT,
    # rotate_every_two's (2j, 2j + 1)); past them (partial rotary) the unrotated columns ROT.. paired as
    # (ROT + t, ROT + (HEAD_DIM - ROT)/2 + t).
    R2: tl.constexpr = ROT // 2
    P2: tl.constexpr = (HEAD_DIM - ROT) // 2
    t = j - R2
    rot_lo, rot_hi = j, j + R2
    if ADJACENT:
        rot_lo, rot_hi = 2 * j, 2 * j + 1
    return tl.where(j < R2, rot_lo, ROT + t), tl.where(j < R2, rot_hi, ROT + P2 + t)


@triton.jit
def _head_row(head, q_heads, kv_heads, HEAD_DIM: tl.constexpr, INTERLEAVED: tl.constexpr):
    # W's first row of head `head` (q heads, then k, then v): head * d, or with INTERLEAVED rows grouped per KV
    # head j as [q_(j*g) .. q_(j*g+g-1); k_j; v_j], g = q_heads / kv_heads (GPT-NeoX: g = 1; Falcon's new
    # decoder architecture).
    row = head * HEAD_DIM
    if INTERLEAVED:
        g = q_heads // kv_heads
        is_q, is_k = head < q_heads, head < q_heads + kv_heads
        group = tl.where(is_q, head // g, tl.where(is_k, head - q_heads, head - q_heads - kv_heads))
        slot = tl.where(is_q, head % g, tl.where(is_k, g, g + 1))
        row = (group * (g + 2) + slot) * HEAD_DIM
    return row


@triton.jit
def _qkv_heads_kernel(y_ptr, qn_ptr, kn_ptr, qk_eps, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, pos_ptr, q_heads,
                      kv_heads, s_cos, s_sin, s_kh, s_ks, s_kd, s_vh, s_vs, s_vd, ROPE: tl.constexpr,
                      PDL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, ROT: tl.constexpr,
                      INTERLEAVED: tl.constexpr, ADJACENT: tl.constexpr = False):
    # One program: one head of the q/k/v projection y (rows, written by the GEMV before it): per-head RMSNorm
    # of q and k, RoPE, q out, k and v into the caches. Reads HEAD_DIM elements of y (+ norm weights, cos,
    # sin), writes HEAD_DIM.
    HALF: tl.constexpr = HEAD_DIM // 2
    if PDL:  # launched early: wait for the GEMV's y, then let the next kernel launch
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    head = tl.program_id(0)
    j = tl.arange(0, BLOCK_H)
    pair_ok = j < HALF
    c_lo, c_hi = _pair_columns(j, HEAD_DIM, ROT, ADJACENT)
    base = _head_row(head, q_heads, kv_heads, HEAD_DIM, INTERLEAVED)
    y_lo = tl.load(y_ptr + base + c_lo, mask=pair_ok, other=0.0).to(tl.float32)
    y_hi = tl.load(y_ptr + base + c_hi, mask=pair_ok, other=0.0).to(tl.float32)
    _heads_epilogue(y_lo, y_hi, head + j * 0, j, c_lo, c_hi, pair_ok, y_ptr, qn_ptr, kn_ptr, qk_eps, cos_ptr,
                    sin_ptr, q_ptr, k_ptr, v_ptr, pos_ptr, q_heads, kv_heads, s_cos, s_sin, s_kh, s_ks, s_kd, s_vh,
                    s_vs, s_vd, ROPE, True, HEAD_DIM, ROT)


@triton.jit
def _heads_epilogue(y_lo, y_hi, head, j, c_lo, c_hi, pair_ok, x_ptr, qn_ptr, kn_ptr, qk_eps, cos_ptr, sin_ptr,
                    q_ptr, k_ptr, v_ptr, pos_ptr, q_heads, kv_heads, s_cos, s_sin, s_kh, s_ks, s_kd, s_vh, s_vs,
                    s_vd, ROPE: tl.constexpr, QK_NORM: tl.constexpr, HEAD_DIM: tl.constexpr, ROT: tl.constexpr):
    # Column pairs j = (c_lo, c_hi) of heads `head` (fp32, the projection's rounding applied): with QK_NORM
    # (whole heads only) weight * RMSNorm over each q and k head, then RoPE on q's and k's first ROT columns,
    # q stored, k and v written at slot pos of the caches. x_ptr gives the dtype eager's tensors round to.
    R2: tl.constexpr = ROT // 2
    is_q = head < q_heads
    is_k = (head >= q_heads) & (head < q_heads + kv_heads)
    if QK_NORM:  # fp32 statistics; the normalised head, then its product with the weight, rounded as eager's
        squares = tl.where(pair_ok, y_lo * y_lo + y_hi * y_hi, 0.0)
        rstd = tl.rsqrt(tl.sum(squares, axis=0) / HEAD_DIM + qk_eps)
        g_lo = tl.where(is_q, tl.load(qn_ptr + c_lo, mask=pair_ok & is_q, other=0.0),
                        tl.load(kn_ptr + c_lo, mask=pair_ok & is_k, other=0.0)).to(tl.float32)
        g_hi = tl.where(is_q, tl.load(qn_ptr + c_hi, mask=pair_ok & is_q, other=0.0),
                        tl.load(kn_ptr + c_hi, mask=pair_ok & is_k, other=0.0)).to(tl.float32)
        normed = is_q | is_k
        y_lo = tl.where(normed, _round(_round(y_lo * rstd, x_ptr) * g_lo, x_ptr), y_lo)
        y_hi = tl.where(normed, _round(_round(y_hi * rstd, x_ptr) * g_hi, x_ptr), y_hi)
    if ROPE:  # q and k: (lo, hi) -> (lo * cos_lo - hi * sin_lo, hi * cos_hi + lo * sin_hi), fp32
        rotate = (is_q | is_k) & (j < R2)  # partial rotary: the pairs past R2 pass through
        c1 = tl.load(cos_ptr + c_lo * s_cos, mask=pair_ok & rotate, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + c_hi * s_cos, mask=pair_ok & rotate, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + c_lo * s_sin, mask=pair_ok & rotate, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + c_hi * s_sin, mask=pair_ok & rotate, other=0.0).to(tl.float32)
        y_lo, y_hi = tl.where(rotate, y_lo * c1 - y_hi * s1, y_lo), tl.where(rotate, y_hi * c2 + y_lo * s2, y_hi)
    q_out = q_ptr + head * HEAD_DIM  # q: (1, q_heads, 1, d), dense
    tl.store(q_out + c_lo, y_lo.to(q_ptr.dtype.element_ty), mask=pair_ok & is_q)
    tl.store(q_out + c_hi, y_hi.to(q_ptr.dtype.element_ty), mask=pair_ok & is_q)
    slot = tl.load(pos_ptr).to(tl.int64)
    k_out = k_ptr + (head - q_heads).to(tl.int64) * s_kh + slot * s_ks
    tl.store(k_out + c_lo * s_kd, y_lo.to(k_ptr.dtype.element_ty), mask=pair_ok & is_k)
    tl.store(k_out + c_hi * s_kd, y_hi.to(k_ptr.dtype.element_ty), mask=pair_ok & is_k)
    is_v = (head >= q_heads + kv_heads) & pair_ok
    v_out = v_ptr + (head - q_heads - kv_heads).to(tl.int64) * s_vh + slot * s_vs
    tl.store(v_out + c_lo * s_vd, y_lo.to(v_ptr.dtype.element_ty), mask=is_v)
    tl.store(v_out + c_hi * s_vd, y_hi.to(v_ptr.dtype.element_ty), mask=is_v)


_QKV_LAYOUT = ["ROPE", "ROT", "INTERLEAVED", "ADJACENT"]
_gemv_qkv_tuned = TunedKernel(_gemv_qkv_kernel, TUNING_SPACE,
                              key=["K", "q_heads", "kv_heads", "HEAD_DIM", *_FLAGS, *_QKV_LAYOUT],
                              prune=_prune_gemv_qkv, family="gemv_qkv", tune="gemv_autotune")


def qkv_heads(weight: torch.Tensor, k_cache: torch.Tensor) -> tuple[int, int, int]:
    """(q_heads, kv_heads, head_dim) of a fused [W_q; W_k; W_v] next to its (b, kv_heads, max_len, d) cache."""
    kv_heads, head_dim = k_cache.shape[1], k_cache.shape[3]
    return weight.shape[0] // head_dim - 2 * kv_heads, kv_heads, head_dim


def q_dtype(x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None) -> torch.dtype:
    """q's dtype as eager gives it: the projection's, or RoPE's result type when it is rotated."""
    return x.dtype if cos is None else result_dtype(x, cos, sin)


def supports_qkv(x, weight, bias, ep: Folded, cos, sin, k_cache, v_cache, pos) -> str | None:
    """None when gemv_qkv's kernel covers the call, else why not (the op then runs the reference)."""
    reason = supports(x, weight, bias, replace(ep, q_norm_weight=None, k_norm_weight=None, heads_interleaved=False,
                                               rope_adjacent=False))
    if reason is not None or ep.glu or ep.residual is not None or ep.act != "none":
        return reason or "a GLU, activation or residual epilogue"
    q_heads, kv_heads, d = qkv_heads(weight, k_cache)
    if d % 2 or weight.shape[0] != (q_heads + 2 * kv_heads) * d or q_heads < 1:
        return f"{weight.shape[0]} rows are not q, k and v heads of {d}"
    if ep.heads_interleaved and q_heads % kv_heads:
        return "rows grouped per KV head with a q head count that is not a multiple of the KV heads'"
    if v_cache.shape[1] != kv_heads or v_cache.shape[3] != d or k_cache.shape[0] != 1 or v_cache.shape[0] != 1:
        return "the caches are not one sequence of the same heads"
    if pos.numel() != 1 or pos.dtype not in (torch.int32, torch.int64):
        return "pos is not one integer slot"
    tables = [] if cos is None else [cos, sin]
    widths = {t.numel() if t.dim() and t.numel() == t.shape[-1] else 0 for t in tables}  # 0: not one row
    if len(widths) > 1 or any(r % 2 or not 2 <= r <= d for r in widths) or any(t.dtype not in DTYPES for t in tables) \
            or (cos is None) != (sin is None):
        return "cos and sin are not one row of r <= d (even) columns"
    if len({t.device for t in (x, weight, k_cache, v_cache, pos, *tables)}) != 1:
        return "tensors on several devices"
    if k_cache.dtype not in DTYPES or v_cache.dtype not in DTYPES:
        return "cache dtypes"
    if (ep.q_norm_weight is None) != (ep.k_norm_weight is None):
        return "a norm on only one of q and k"
    if not _is_vector(ep.q_norm_weight, d, weight.dtype) or not _is_vector(ep.k_norm_weight, d, weight.dtype):
        return "the q/k norm weights are not contiguous vectors of d in the weight's dtype"
    return None


def head_rms_norm(t: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * RMSNorm(t) over the last dim, as HF's Qwen3RMSNorm computes it (fp32 statistics, the normalised
    tensor rounded to t's dtype before the weight)."""
    hf = t.float()
    return weight * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(t.dtype)


def gemv_qkv_reference(x, weight, bias, ep: Folded, cos, sin, k_cache, v_cache, pos) -> torch.Tensor:
    """The eager ops the kernel replaces: the GEMV, the head split, RoPE on q and k, the two cache writes."""
    q_heads, kv_heads, d = qkv_heads(weight, k_cache)
    y = gemv_reference(x, weight, bias, replace(ep, heads_interleaved=False, rope_adjacent=False))  # (1, 1, rows)
    if ep.heads_interleaved:  # per KV head: its g q heads, its k head, its v head
        g = q_heads // kv_heads
        grouped = y.reshape(1, 1, kv_heads, g + 2, d)
        q = grouped[:, :, :, :g].reshape(1, 1, q_heads, d).transpose(1, 2)  # (1, q_heads, 1, d)
        k, v = (grouped[:, :, :, i].transpose(1, 2) for i in (g, g + 1))  # (1, kv_heads, 1, d)
    else:
        q, k, v = (t.reshape(1, 1, -1, d).transpose(1, 2)  # (1, heads, 1, d)
                   for t in y.split([q_heads * d, kv_heads * d, kv_heads * d], dim=-1))
    if ep.q_norm_weight is not None:
        q, k = head_rms_norm(q, ep.q_norm_weight, ep.qk_eps), head_rms_norm(k, ep.k_norm_weight, ep.qk_eps)
    if cos is not None:
        q, k = rope_reference(q, cos, sin, ep.rope_adjacent), rope_reference(k, cos, sin, ep.rope_adjacent)
    slots = cache_slots(pos.reshape(-1), 1)
    k_cache.index_copy_(2, slots, k.to(k_cache.dtype))
    v_cache.index_copy_(2, slots, v.to(v_cache.dtype))
    return q.contiguous()


def gemv_qkv(x, weight, bias, ep: Folded, cos, sin, k_cache, v_cache, pos) -> torch.Tensor:
    """The kernel's launcher (inputs already checked by supports_qkv)."""
    q_heads, kv_heads, d = qkv_heads(weight, k_cache)
    x_row = x.reshape(-1).contiguous()  # (K,)
    q = torch.empty(1, q_heads, 1, d, device=x.device, dtype=q_dtype(x, cos, sin))
    n, k = weight.shape
    rope = cos is not None
    cos_row = cos.reshape(-1) if rope else x_row
    sin_row = sin.reshape(-1) if rope else x_row
    layout = dict(ROT=cos_row.numel() if rope else d, INTERLEAVED=ep.heads_interleaved, ADJACENT=ep.rope_adjacent)
    pdl = use_pdl(x.device)
    tables = (cos_row, sin_row, q, k_cache, v_cache, pos)
    strides = (q_heads, kv_heads, cos_row.stride(0), sin_row.stride(0), k_cache.stride(1), k_cache.stride(2),
               k_cache.stride(3), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3))
    if ep.q_norm_weight is not None:  # the GEMV over every program, then one program per head normalises it
        y = torch.empty(n, device=x.device, dtype=x.dtype)  # (rows,)
        _launch(x_row, weight, y, None, replace(ep, bias=bias, q_norm_weight=None, k_norm_weight=None,
                                                heads_interleaved=False, rope_adjacent=False))
        _qkv_heads_kernel[(n // d,)](y, ep.q_norm_weight, ep.k_norm_weight, ep.qk_eps, *tables, *strides, ROPE=rope,
                                     PDL=pdl, HEAD_DIM=d, BLOCK_H=triton.next_power_of_2(d // 2),
                                     num_warps=1 if d <= 128 else 2, **layout, **launch_options(pdl))
        return q
    _gemv_qkv_tuned[lambda meta: (triton.cdiv(n // 2, meta["BLOCK_N"]),)](
        x_row, weight, _or(bias, x_row), _or(ep.norm_weight, x_row), _or(ep.norm_bias, x_row), cos_row, sin_row,
        q, k_cache, v_cache, pos, k, weight.stride(0), ep.eps, *strides,
        HAS_BIAS=bias is not None, NORM=ep.norm_weight is not None, LAYER=ep.layer_norm,
        NORM_BIAS=ep.norm_bias is not None, ROPE=rope, PDL=pdl, HEAD_DIM=d, **layout, **launch_options(pdl))
    return q


@torch.library.custom_op("fxopt::gemv_qkv", mutates_args=("k_cache", "v_cache"))
def gemv_qkv_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, norm_weight: torch.Tensor | None,
                eps: float, cos: torch.Tensor | None, sin: torch.Tensor | None, k_cache: torch.Tensor,
                v_cache: torch.Tensor, pos: torch.Tensor, norm_bias: torch.Tensor | None = None,
                layer_norm: bool = False, q_norm_weight: torch.Tensor | None = None,
                k_norm_weight: torch.Tensor | None = None, qk_eps: float = 0.0, interleaved: bool = False,
                adjacent: bool = False) -> torch.Tensor:
    """The q/k/v projection of a decode step with its head split, per-head q/k RMSNorm, RoPE and cache writes
    (see above). The LayerNorm, q/k norm and layout arguments come last: the decode pass passes them by
    keyword, so a node's ten positional arguments stay what passes/cost.py reads."""
    ep = Folded(norm_weight=norm_weight, eps=eps, norm_bias=norm_bias, layer_norm=layer_norm,
                q_norm_weight=q_norm_weight, k_norm_weight=k_norm_weight, qk_eps=qk_eps,
                heads_interleaved=interleaved, rope_adjacent=adjacent)
    if ops_use_kernels(x) and supports_qkv(x, weight, bias, ep, cos, sin, k_cache, v_cache, pos) is None:
        return gemv_qkv(x, weight, bias, ep, cos, sin, k_cache, v_cache, pos)
    return gemv_qkv_reference(x, weight, bias, ep, cos, sin, k_cache, v_cache, pos)


@gemv_qkv_op.register_fake
def _(x, weight, bias, norm_weight, eps, cos, sin, k_cache, v_cache, pos, norm_bias=None, layer_norm=False,
      q_norm_weight=None, k_norm_weight=None, qk_eps=0.0, interleaved=False, adjacent=False):
    q_heads, _, d = qkv_heads(weight, k_cache)
    return x.new_empty((1, q_heads, 1, d), dtype=q_dtype(x, cos, sin))
