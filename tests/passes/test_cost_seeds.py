"""The seed documents' worked figures, asserted exactly against the cost pass."""

import sympy
import torch
from torch import nn

from fxopt.capture import capture, role_symbol
from fxopt.hardware import get_hardware
from fxopt.passes import cost
from fxopt.pipeline import make_context

N, H = role_symbol("seq"), role_symbol("h")


class StandardAttention(nn.Module):
    """One head of unfused attention: S = QKᵀ, P = softmax(S), O = PV."""

    def forward(self, q, k, v):  # (N, h) each
        scores = q @ k.transpose(0, 1)  # (N, N)
        probs = torch.softmax(scores, dim=-1)
        return probs @ v  # (N, h)


def _captured_total(module, kwargs, roles):
    captured = capture(module, kwargs, roles)
    ctx = make_context(captured, "h100", None)
    cost.run(captured.gm, ctx)
    return cost.graph_total(captured.gm), ctx


def test_standard_attention_costs_4h_plus_3_n_squared_flops_over_8n2_plus_8nh_bytes():
    qkv = {name: torch.randn(32, 8, dtype=torch.float16) for name in "qkv"}
    roles = {name: {0: "seq", 1: "h"} for name in "qkv"}
    summed, ctx = _captured_total(StandardAttention(), qkv, roles)
    assert sympy.expand(summed.flops - (4 * H + 3) * N**2) == 0
    assert sympy.expand(summed.bytes - (8 * N**2 + 8 * N * H)) == 0
    at_4096 = {N: 4096, H: 4096}
    assert summed.flops.xreplace(at_4096) == (4 * 4096 + 3) * 4096**2
    assert summed.bytes.xreplace(at_4096) == 8 * 4096**2 + 8 * 4096 * 4096


def test_square_fp16_gemm_intensity_is_1365_3():
    class Gemm(nn.Module):
        def forward(self, a, b):
            return a @ b

    ab = {"a": torch.randn(16, 16, dtype=torch.float16), "b": torch.randn(16, 16, dtype=torch.float16)}
    roles = {"a": {0: "m", 1: "k"}, "b": {0: "k", 1: "n"}}
    summed, _ = _captured_total(Gemm(), ab, roles)
    m, k, n = (role_symbol(r) for r in "mkn")
    at = {m: 4096, k: 4096, n: 4096}
    intensity = summed.flops.xreplace(at) / summed.bytes.xreplace(at)
    assert intensity == sympy.Rational(2 * 4096**3, 3 * 2 * 4096**2)
    assert round(float(intensity), 1) == 1365.3


def test_a10_ridge_point_is_208_3():
    a10 = get_hardware("a10")
    assert a10.ridge("float16") == 125e12 / 600e9
    assert round(a10.ridge("float16"), 1) == 208.3


def test_predicted_time_is_the_larger_of_compute_and_memory_time():
    h100 = get_hardware("h100")
    assert h100.predicted_time(1e12, 1e6, torch.float16, matmul=True) == 1e12 / 989.4e12
    assert h100.predicted_time(1e6, 1e9, torch.float16, matmul=False) == 1e9 / 3350e9
    assert h100.bound(1e12, 1e6, torch.float16, matmul=True) == "compute"


def test_kv_cache_takes_2_2_layers_d_model_bytes_per_token_in_fp16():
    from fxopt import models

    for name in ("gpt2-small", "gpt2-medium", "gpt2-large"):
        config = models.PRESETS[name]
        head_dim = config.d_model // config.n_heads
        per_token = cost.kv_cache_bytes_per_token(config.n_layers, config.n_heads, head_dim, torch.float16)
        assert per_token == 2 * 2 * config.n_layers * config.d_model


class CachedDecodeStep(nn.Module):
    """One token of one attention layer against a cache of n earlier tokens (the decode-step shape)."""

    def __init__(self, d_model=32, heads=4):
        super().__init__()
        self.heads, self.head_dim = heads, d_model // heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x, k_cache, v_cache):  # x (b, 1, d); caches (b, heads, n, head_dim)
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        keys = torch.cat([k_cache, k], dim=2)  # (b, heads, n + 1, head_dim)
        values = torch.cat([v_cache, v], dim=2)
        y = torch.nn.functional.scaled_dot_product_attention(q, keys, values)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


def test_decode_step_cost_is_linear_in_cache_length():
    step = CachedDecodeStep().eval()
    kwargs = {"x": torch.randn(2, 1, 32), "k_cache": torch.randn(2, 4, 9, 8), "v_cache": torch.randn(2, 4, 9, 8)}
    roles = {"x": {0: "batch"}, "k_cache": {0: "batch", 2: "cache"}, "v_cache": {0: "batch", 2: "cache"}}
    summed, _ = _captured_total(step, kwargs, roles)
    n = role_symbol("cache")
    assert sympy.degree(summed.flops, n) == 1
    assert sympy.degree(summed.bytes, n) == 1


def test_prefill_cost_is_quadratic_in_sequence_length():
    from fxopt import models

    model = models.build("gpt2-tiny")
    summed, _ = _captured_total(model, model.example_inputs(2, 16), None)
    s = role_symbol("seq")
    assert sympy.degree(summed.flops, s) == 2
    assert sympy.Poly(summed.flops, s).coeffs()[0].is_positive


class FxoptDecodeStep(nn.Module):
    """The decode step as fxopt's KV-cache pass writes it: cache_write, then cached_attention over the cache."""

    def forward(self, q, k_new, v_new, k_cache, v_cache, pos, kv_start, kv_len):
        torch.ops.fxopt.cache_write(k_cache, k_new, pos)
        torch.ops.fxopt.cache_write(v_cache, v_new, pos)
        return torch.ops.fxopt.cached_attention(q, k_cache, v_cache, kv_start, kv_len, 0.25)


def test_fxopt_decode_attention_cost_is_linear_in_cache_length():
    import fxopt.codegen.attention_op  # noqa: F401 - registers torch.ops.fxopt

    b, h, d, n = 2, 4, 16, 24
    kwargs = {"q": torch.randn(b, h, 1, d), "k_new": torch.randn(b, h, 1, d), "v_new": torch.randn(b, h, 1, d),
              "k_cache": torch.randn(b, h, n, d), "v_cache": torch.randn(b, h, n, d),
              "pos": torch.tensor(5), "kv_start": torch.zeros(b, dtype=torch.long),
              "kv_len": torch.full((b,), 6, dtype=torch.long)}
    roles = {"k_cache": {2: "cache"}, "v_cache": {2: "cache"}}
    summed, ctx = _captured_total(FxoptDecodeStep(), kwargs, roles)
    cache = role_symbol("cache")
    assert sympy.degree(summed.flops, cache) == 1
    assert sympy.expand(summed.flops - 4 * b * h * 1 * cache * d) == 0  # attention over the full cache
    # fp32: q and the output once (4bhd each), both caches read once (2 * 4bhdn), kv_start/kv_len (2 * 8b),
    # and each cache write reads and writes its new row (2 * 2 * 4bhd)
    assert sympy.expand(summed.bytes - (8 * b * h * d * cache + 24 * b * h * d + 16 * b)) == 0
