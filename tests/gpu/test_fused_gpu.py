"""Generated fused kernels on CUDA at full size, vs eager (skipped without a GPU).

The chains of tests/codegen/test_fused.py at the benchmark shapes: (8192, 4096) bf16 for
the row chains, SwiGLU and GELU, 2**26 fp32 elements for E = D + (A+B)*C; plus strided and
broadcast layouts, two-dim pointwise tiles, a vocab-sized log_softmax (multi-pass loop), and the
int64-offset paths
(> 2**31 elements; marked slow). Same numerics rule as on CPU (DESIGN.md).
"""

import os

import pytest
import torch
import torch.nn.functional as F
from fused_chains import (
    casts,
    chain_e,
    gelu_exact,
    gelu_tanh,
    layer_norm,
    rms_norm_op,
    rmsnorm_residual,
    softmax_scale_mask,
    swiglu,
)

from fxopt.codegen.fused import compile_region, region_from_fn

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

FLOOR = {torch.float32: 1e-5, torch.float16: 5e-4, torch.bfloat16: 4e-3}
BIG = (8192, 4096)


@pytest.fixture(autouse=True)
def _real_triton(monkeypatch):
    """Compile for the GPU even if TRITON_INTERPRET=1 leaked into this process; one kernel config
    per test instead of an autotuning sweep (FXOPT_FUSED_AUTOTUNE=0; test_autotuned turns it on),
    so the grid compiles in minutes."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("FXOPT_FUSED_AUTOTUNE", os.environ.get("FXOPT_FUSED_AUTOTUNE", "0"))


def assert_matches(got, eager, ref, name=""):
    assert got.shape == eager.shape and got.dtype == eager.dtype, name
    g, e, r = got.double(), eager.double(), ref.double()
    assert torch.equal(g.isnan(), e.isnan()), f"{name}: NaN pattern differs"
    ok = ~(g.isnan() | r.isinf())
    g, e, r = g[ok], e[ok], r[ok]
    factor = 2.0 if got.dtype == torch.float32 else 3.0
    err = (g - r).abs().max().item()
    eager_err = (e - r).abs().max().item()
    bound = factor * eager_err + FLOOR[got.dtype] * max(1.0, r.abs().max().item())
    assert err <= bound, f"{name}: error {err:.3g} > {bound:.3g} (eager error {eager_err:.3g})"


def run_check(fn, *args, tmp_path=None, name=None):
    kernel = compile_region(region_from_fn(fn, *args), name or fn.__name__, dump_dir=tmp_path)
    got = kernel(*args)
    torch.cuda.synchronize()
    eager = fn(*args)
    eager = eager if isinstance(eager, tuple) else (eager,)
    ref = fn(*[a.double() if a.is_floating_point() else a for a in args])
    ref = ref if isinstance(ref, tuple) else (ref,)
    for i, (g, e, r) in enumerate(zip(got, eager, ref)):
        assert g.is_cuda
        assert_matches(g, e, r, f"{fn.__name__} output {i}")
    return kernel







def softmax_scale(x):
    return torch.softmax(x * 0.125, dim=-1)


def log_softmax(x):
    return F.log_softmax(x.float(), dim=-1)






def row_reductions(x):
    return x.mean(-1), x.sum(-1, keepdim=True), x.amax(-1)


def randn(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape, device="cuda", dtype=dtype)


def test_chain_e_2_26_fp32(tmp_path):
    n = 1 << 26
    run_check(chain_e, *[randn(n, dtype=torch.float32) for _ in range(4)], tmp_path=tmp_path)


@pytest.mark.parametrize(
    "fn, kinds",
    [
        (rmsnorm_residual, "xxw"),
        (rms_norm_op, "xxw"),
        (layer_norm, "xww"),
        (softmax_scale, "x"),
        (softmax_scale_mask, "xm"),
        (log_softmax, "x"),
        (swiglu, "xx"),
        (gelu_tanh, "xw"),
        (gelu_exact, "x"),
        (casts, "xx"),
        (row_reductions, "x"),
    ],
    ids=lambda v: getattr(v, "__name__", v),
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_chains_full_size(fn, kinds, dtype, tmp_path):
    args = []
    for kind in kinds:
        if kind == "x":
            args.append(randn(*BIG, dtype=dtype))
        elif kind == "w":
            args.append(randn(BIG[-1], dtype=dtype))
        else:
            m = torch.rand(*BIG, device="cuda") > 0.6
            m[:, 0] = False
            args.append(m)
    run_check(fn, *args, tmp_path=tmp_path)


@pytest.mark.parametrize("fn, kinds", [(rmsnorm_residual, "xxw"), (softmax_scale, "x"), (gelu_tanh, "xw"),
                                       (log_softmax, "x")], ids=lambda v: getattr(v, "__name__", v))
def test_autotuned(fn, kinds, tmp_path, monkeypatch):
    """The autotuning path (every config compiled and timed, the best kept) gives the same results."""
    monkeypatch.setenv("FXOPT_FUSED_AUTOTUNE", "1")
    shape = (512, 50257) if fn is log_softmax else BIG
    args = [randn(*shape) if k == "x" else randn(shape[-1]) for k in kinds]
    kernel = run_check(fn, *args, tmp_path=tmp_path, name=f"autotuned_{fn.__name__}")
    assert kernel.module.AUTOTUNE


@pytest.mark.parametrize("layout", ["transposed", "sliced", "broadcast"])
@pytest.mark.parametrize("fn", [chain_e, rmsnorm_residual, layer_norm], ids=lambda f: f.__name__)
def test_layouts(fn, layout, tmp_path):
    shape = (64, 33, 1000)

    def make(slot):
        if layout == "transposed":
            return randn(*shape[::-1]).permute(2, 1, 0)
        if layout == "sliced":
            return randn(shape[0] + 1, shape[1], 2 * shape[2])[1:, :, ::2]
        return randn(1, 1, shape[2]).expand(shape) if slot % 2 == 0 else randn(shape[0], shape[1], 1).expand(shape)

    n_full = {chain_e: 4, rmsnorm_residual: 2, layer_norm: 1}[fn]
    args = [make(i) for i in range(n_full)] + [randn(shape[-1]) for _ in range({chain_e: 0, rmsnorm_residual: 1,
                                                                                 layer_norm: 2}[fn])]
    run_check(fn, *args, tmp_path=tmp_path)


def bias_gelu_mul(x, y):
    return F.gelu(x * y + 1.0, approximate="tanh")


@pytest.mark.parametrize("case", ["row_bias", "col_bias", "transposed", "rows_past_grid_y"])
@pytest.mark.parametrize("autotune", [False, True], ids=["default", "autotuned"])
def test_two_dim_pointwise_tiles(case, autotune, tmp_path, monkeypatch):
    """Pointwise regions that collapse to two dims run the 2-D tiled kernel (more than 65535 rows: the
    strided one), default config and autotuned."""
    monkeypatch.setenv("FXOPT_FUSED_AUTOTUNE", "1" if autotune else "0")
    x = randn(*BIG)
    y = {
        "row_bias": lambda: randn(BIG[-1]),
        "col_bias": lambda: randn(BIG[0], 1),
        "transposed": lambda: randn(BIG[::-1]).t(),
        "rows_past_grid_y": lambda: randn(48),
    }[case]()
    if case == "rows_past_grid_y":
        x = randn(70001, 48)
    run_check(bias_gelu_mul, x, y, tmp_path=tmp_path, name=f"tiles_{case}_{autotune}")


@pytest.mark.parametrize("rows", [1, 8, 512])
def test_vocab_log_softmax_multipass(rows, tmp_path):
    run_check(log_softmax, randn(rows, 50257), tmp_path=tmp_path)


@pytest.mark.slow
def test_int64_offsets_pointwise(tmp_path):
    n = (1 << 31) + 4099
    x = randn(n, dtype=torch.float16)
    kernel = compile_region(region_from_fn(lambda x: x * 2.0 + 1.0, x[:8]), "big_pointwise", dump_dir=tmp_path)
    (got,) = kernel(x)
    tail = slice(n - 5000, n)
    torch.testing.assert_close(got[tail], x[tail] * 2.0 + 1.0)
    torch.testing.assert_close(got[:5000], x[:5000] * 2.0 + 1.0)


@pytest.mark.slow
def test_int64_offsets_rows(tmp_path):
    rows = (1 << 31) // 4096 + 3
    x = randn(rows, 4096)
    w = randn(4096)
    kernel = compile_region(region_from_fn(rms_norm_op, x[:2], x[:2], w), "big_rows", dump_dir=tmp_path)
    h, y = kernel(x, x, w)
    for sl in (slice(0, 4), slice(rows - 4, rows)):
        eh, ey = rms_norm_op(x[sl], x[sl], w)
        torch.testing.assert_close(h[sl], eh)
        torch.testing.assert_close(y[sl], ey, atol=2e-2, rtol=2e-2)
