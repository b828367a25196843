"""The runtime of generated fused kernels (fxopt.codegen.fused_runtime) on its own, against references
written here: brute-force index enumeration, the pruners' documented rules, torch's fp32 -> bf16 rounding."""

import itertools
import math
import os
import random

import torch

# Before Triton is imported: the rounding kernel below runs in Triton's CPU interpreter (only without a GPU).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from test_tuning import FakeKernel  # noqa: E402

from fxopt.codegen import fused_runtime as rt  # noqa: E402
from fxopt.codegen import loader  # noqa: E402
from fxopt.codegen.fused import generate_source, region_from_fn  # noqa: E402
from fxopt.codegen.tuning import TunedKernel  # noqa: E402

# ----------------------------------------------------------------------------- collapse


def _offsets(shape, strides):
    """Every element's offset, in row-major order of `shape` (outermost dim first)."""
    return [sum(i * s for i, s in zip(idx, strides)) for idx in itertools.product(*(range(n) for n in shape))]


def _collapsed_offsets(ndim, sizes, strides):
    """Every element's offset through collapse's result (innermost dim first), in the same order."""
    outer_first = list(zip(sizes[:ndim], strides[:ndim]))[::-1]
    return _offsets([n for n, _ in outer_first], [s for _, s in outer_first])


def _random_layout(rng: random.Random, n_tensors: int):
    """A shape of rank 0-5 with some size-1 dims, and per tensor strides: contiguous, permuted, sliced or
    broadcast (stride 0) along some dims."""
    rank = rng.randint(0, 5)
    shape = [rng.choice([1, 1, 2, 3, 4, 5]) for _ in range(rank)]
    strides = []
    for _ in range(n_tensors):
        kind = rng.choice(["contiguous", "permuted", "sliced", "broadcast"])
        if kind == "permuted":
            order = list(range(rank))
            rng.shuffle(order)
            t = torch.empty([shape[d] for d in order]).permute(tuple(order.index(d) for d in range(rank)))
        elif kind == "sliced":  # every other element along some dims
            steps = [rng.choice([1, 2]) for _ in range(rank)]
            t = torch.empty([n * k for n, k in zip(shape, steps)])[tuple(slice(None, None, k) for k in steps)]
        else:
            t = torch.empty(shape)
        st = list(t.stride())
        assert list(t.shape) == shape
        if kind == "broadcast":
            st = [0 if rng.random() < 0.5 else s for s in st]
        strides.append(tuple(st))
    return tuple(shape), strides


@pytest.mark.parametrize("seed", range(40))
def test_collapse_keeps_every_offset(seed):
    rng = random.Random(seed)
    shape, strides = _random_layout(rng, rng.randint(1, 4))
    max_dims = max(1, len(shape))
    ndim, sizes, per_tensor = rt.collapse(shape, strides, max_dims)
    assert 1 <= ndim <= max_dims and len(sizes) == max_dims
    assert math.prod(sizes) == math.prod(shape)
    assert ndim <= max(1, sum(n != 1 for n in shape))  # size-1 dims are gone
    assert all(n == 1 for n in sizes[ndim:])
    for st, got in zip(strides, per_tensor):
        assert len(got) == max_dims and all(s == 0 for s in got[ndim:])
        assert _collapsed_offsets(ndim, sizes, got) == _offsets(shape, st)
    # merging is complete: no two neighbouring dims left that every tensor walks as one
    for d in range(ndim - 1):
        inner, outer = d, d + 1
        assert not all(t[outer] == t[inner] * sizes[inner] for t in per_tensor), (shape, strides, d)


def test_collapse_merges_contiguous_and_keeps_a_broadcast_dim():
    # a contiguous 3-D tensor is one run of 24 elements
    assert rt.collapse((2, 3, 4), [(12, 4, 1)], 3)[:2] == (1, [24, 1, 1])
    # beside a row broadcast along the two leading dims: those two merge, the inner dim stays apart
    ndim, sizes, strides = rt.collapse((2, 3, 4), [(12, 4, 1), (0, 0, 1)], 3)
    assert (ndim, sizes) == (2, [4, 6, 1]) and strides[1][:2] == [1, 0]


def test_collapse_of_a_scalar_shape():
    assert rt.collapse((), [(), ()], 2) == (1, [1, 1], [[0, 0], [0, 0]])
    assert rt.collapse((1, 1), [(5, 1)], 1) == (1, [1], [[0]])


# ----------------------------------------------------------------------------- needs_int64

MARGIN = 1 << 24  # documented: the masked lanes of the last block may reach past the end


@pytest.mark.parametrize("reach, expected", [(2**31 - MARGIN - 1, False), (2**31 - MARGIN, True), (2**31, True)])
def test_needs_int64_by_element_count(reach, expected):
    t = torch.empty(reach, device="meta")
    assert rt.needs_int64(t.numel(), [t]) is expected


def test_needs_int64_by_the_farthest_offset():
    # few elements, but rows 2**30 apart: the last element's offset is 3 * 2**30 + 1
    strided = torch.empty(4, 1 << 30, device="meta")[:, :2]
    assert rt.needs_int64(strided.numel(), [strided])
    below = torch.empty(2, 2**31 - MARGIN - 2, device="meta")[:, :2]  # farthest offset 2**31 - MARGIN - 1
    assert not rt.needs_int64(below.numel(), [below])
    # a broadcast input reaches no farther than its own storage
    wide = torch.empty(1, 8, device="meta").expand(2**20, 8)
    assert not rt.needs_int64(64, [wide])


# ----------------------------------------------------------------------------- pruners


def test_pointwise_pruner_puts_32_bytes_per_thread_first():
    configs = rt.pointwise_configs(interpret=False)
    for element_bytes in (1, 2, 4, 8):
        got = rt.pointwise_pruner(element_bytes)(configs, {})
        assert sorted(map(id, got)) == sorted(map(id, configs))  # autotuning still sees every config

        def distance(c, element_bytes=element_bytes):
            per_thread = c.kwargs["BLOCK"] * element_bytes / (32 * c.num_warps)
            return abs(math.log2(per_thread / 32))

        assert [distance(c) for c in got] == sorted(distance(c) for c in configs)
        best = min(distance(c) for c in configs)
        ties = [c for c in configs if distance(c) == best]
        assert got[: len(ties)] == ties  # ties in the list's order
    # 2-byte elements: 32 bytes a thread is 16 elements, 2048 on 4 warps (the SwiGLU measurement)
    first = rt.pointwise_pruner(2)(configs, {})[0]
    assert (first.kwargs["BLOCK"], first.num_warps) == (2048, 4)


def test_prune_tile_configs_takes_the_inner_bucket_capped_at_2048():
    configs = rt.tile_configs(interpret=False)
    for bucket in [2**k for k in range(0, 15)]:
        block_c = min(max(bucket, 16), 2048)
        for how in ("named", "keyword"):
            got = (rt.prune_tile_configs(configs, {"size0_bucket": bucket}) if how == "named"
                   else rt.prune_tile_configs(configs, {}, size0_bucket=bucket))
            assert got == [c for c in configs if c.kwargs["BLOCK_C"] == block_c], (bucket, how)
            # the rows fill 2048-element tiles on 4 warps, 4096 on 8
            assert got and all(c.kwargs["ROWS_T"] * block_c == {4: 2048, 8: 4096}[c.num_warps] for c in got)
    assert rt.prune_tile_configs(configs, {}) == configs  # no bucket: nothing to choose by
    odd = [triton.Config({"ROWS_T": 4, "BLOCK_C": 8}, num_warps=4), triton.Config({"ROWS_T": 2, "BLOCK_C": 8})]
    assert rt.prune_tile_configs(odd, {"size0_bucket": 64}) == odd[:1]


def _row_rule(c, block_n) -> bool:
    """The documented whole-row tile rule, restated: 2-8K elements (or one long row, or 64 short rows),
    8-32 elements a thread, at least 16 for tiles of 4096 and up."""
    rows = c.kwargs["ROWS"]
    tile = rows * block_n
    shape_ok = tile in (2048, 4096, 8192) or (rows == 1 and block_n > 8192) or (rows == 64 and tile < 2048)
    per_thread = tile // (32 * c.num_warps)
    return shape_ok and (16 if tile >= 4096 else 8) <= per_thread <= 32


@pytest.mark.parametrize("row_bytes", [2, 4, 8, 12])
def test_row_pruner_keeps_the_rule_and_orders_by_32_kb_tiles(row_bytes):
    configs = rt.row_configs(interpret=False)
    prune = rt.row_pruner(row_bytes)
    for block_n in [2**k for k in range(4, 17)]:
        got = prune(configs, {"n_bucket": block_n})
        expected = [c for c in configs if _row_rule(c, block_n)]
        if not expected:
            assert [(c.kwargs, c.num_warps) for c in got] == [({"ROWS": 1}, 8)], block_n
            continue
        assert sorted(map(id, got)) == sorted(map(id, expected)), block_n
        target = max(1, (32 * 1024) // (block_n * row_bytes))
        distances = [abs(math.log2(c.kwargs["ROWS"] / target)) for c in got]
        assert distances == sorted(distances), block_n
        assert [c for c in got if abs(math.log2(c.kwargs["ROWS"] / target)) == distances[0]] == [
            c for c in expected if abs(math.log2(c.kwargs["ROWS"] / target)) == distances[0]]  # ties in order
    assert prune(configs, {}) == configs


def test_row_pruner_defaults_match_the_measurements():
    """4096-wide bf16 rows: LayerNorm (4 bytes a column) on 2 rows, RMSNorm + residual (8 bytes) on 1."""
    configs = rt.row_configs(interpret=False)
    assert rt.row_pruner(4)(configs, {"n_bucket": 4096})[0].kwargs["ROWS"] == 2
    assert rt.row_pruner(8)(configs, {}, n_bucket=4096)[0].kwargs["ROWS"] == 1
    # 1024-wide rows of 4 bytes a column: 8 rows move 32 KB, 4 rows 16 KB
    assert rt.row_pruner(4)(configs, {"n_bucket": 1024})[0].kwargs["ROWS"] == 8
    assert rt.row_pruner(4, tile_bytes=16 * 1024)(configs, {"n_bucket": 1024})[0].kwargs["ROWS"] == 4


def test_interpreter_configs_are_single():
    for make in (rt.pointwise_configs, rt.tile_configs, rt.row_configs, rt.loop_configs):
        assert len(make(interpret=True)) == 1 and len(make(interpret=False)) > 1
        assert make(interpret=False) is not make(interpret=False)  # each module its own list


# ----------------------------------------------------------------------------- autotune (codegen/tuning.py)


def test_autotune_without_tuning_chooses_once_per_key_value():
    configs = [triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((64, 4), (128, 8), (256, 2))]
    calls = []

    def prune(configs, named_args, **kwargs):
        calls.append(named_args.get("n_bucket", kwargs.get("n_bucket")))
        return configs[::-1] if named_args.get("n_bucket", kwargs.get("n_bucket")) > 100 else configs

    fn = FakeKernel()
    fixed = rt.autotune(configs, key=["n_bucket"], prune=prune, interpret=False, tune=False)(fn)
    assert isinstance(fixed, TunedKernel)
    for bucket in (64, 64, 512, 64, 512):
        fixed[(1,)]("ptr", bucket - 1, bucket)
    fixed[(2,)]("ptr", 7, n_bucket=512)  # the key by name: still the choice made for 512
    assert calls == [64, 512]
    blocks = [(kw["BLOCK"], kw["num_warps"]) for _, _, kw in fn.launches]
    assert blocks == [(64, 4), (64, 4), (256, 2), (64, 4), (256, 2), (256, 2)]
    assert fn.launches[-1][0] == (2,) and fn.launches[-1][1] == ("ptr", 7)


def test_autotune_in_the_interpreter_runs_the_first_config_unpruned():
    configs = [triton.Config({"BLOCK": 32}, num_warps=4), triton.Config({"BLOCK": 64}, num_warps=4)]

    def prune(configs, named_args, **kwargs):
        raise AssertionError("no pruning in the interpreter")

    fn = FakeKernel()
    fixed = rt.autotune(configs, key=["n_bucket"], prune=prune, interpret=True, tune=True)(fn)
    fixed[(1,)]("ptr", 3, 4)
    fixed[(1,)]("ptr", 300, 512)
    assert [kw["BLOCK"] for _, _, kw in fn.launches] == [32, 32]


# ----------------------------------------------------------------------------- launch plans


def test_plan_is_cached_per_layout():
    made = []

    def make(tensors, max_dims):
        made.append(max_dims)
        return object()

    rt.PLANS.clear()
    try:
        x = torch.empty(4, 6)
        a = rt.plan(make, [x, x], 2)
        assert rt.plan(make, [torch.empty(4, 6), x], 2) is a  # same shapes and strides: the same plan
        assert rt.plan(make, [x.t().contiguous().t(), x], 2) is not a  # other strides
        assert rt.plan(make, [x, x], 3) is not a
        assert rt.plan(make, [x, x], 2) is a  # kept while other layouts were added
        assert made == [2, 2, 3]
        for n in range(5000):  # a bounded cache: many layouts do not grow it without end
            rt.plan(make, [torch.empty(1, n + 1)], 2)
        assert len(rt.PLANS) <= 4097
    finally:
        rt.PLANS.clear()


def test_pointwise_plan_of_broadcast_inputs():
    x, bias, one = torch.empty(3, 5), torch.empty(5), torch.empty(1, 1)
    shape, numel, bucket, contiguous, scalar, ndim, sizes, strides, index_64 = rt.pointwise_plan([x, one], 2)
    assert (tuple(shape), numel, bucket, contiguous, scalar, ndim, index_64) == ((3, 5), 15, 16, True,
                                                                                 [False, True], 1, False)
    plan = rt.pointwise_plan([x, bias], 2)
    assert plan[3] is False and plan[5] == 2
    assert _collapsed_offsets(plan[5], plan[6], plan[7][1]) == _offsets((3, 5), (0, 1))


def test_row_plan_splits_rows_and_columns():
    x, w = torch.empty(2, 3, 7).transpose(0, 1), torch.empty(7)
    shape, n_rows, n_cols, lead_dims, lead_sizes, lead_strides, col_strides, index_64 = rt.row_plan([x, w], 2)
    assert (tuple(shape), n_rows, n_cols, col_strides, index_64) == ((3, 2, 7), 6, 7, [1, 1], False)
    for t, st in zip((x, w.expand(3, 2, 7)), lead_strides):
        assert _collapsed_offsets(lead_dims, lead_sizes, st) == _offsets((3, 2), t.stride()[:-1])


# ----------------------------------------------------------------------------- bf16 rounding

interpreting = pytest.mark.skipif(not loader.interpreting(), reason="needs TRITON_INTERPRET=1 (CPU interpreter)")

# jit wrappers made like a generated module makes them (module globals, so the kernels below can call them)
round_bf16 = rt.round_bf16_for(True)
keep_fp32 = rt.round_bf16_for(False)


@triton.jit
def _round_kernel(x_ptr, out_ptr, n, GPU_BODY: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    if GPU_BODY:
        y = keep_fp32(x)
    else:
        y = round_bf16(x)
    tl.store(out_ptr + offs, y, mask=mask)


def _run_round(x: torch.Tensor, gpu_body: bool = False) -> torch.Tensor:
    out = torch.empty_like(x)
    _round_kernel[(triton.cdiv(x.numel(), 256),)](x, out, x.numel(), GPU_BODY=gpu_body, BLOCK=256)
    return out


def _bf16_test_values() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    random_values = torch.randn(2000, generator=g) * torch.exp2(torch.randint(-40, 40, (2000,), generator=g).float())
    bits = torch.randint(0, 1 << 16, (400,), generator=g, dtype=torch.int32)
    # ties: the dropped 16 bits exactly 0x8000, on even and odd kept bits, both signs
    ties = ((bits << 16) | 0x8000).view(torch.float32)
    near_ties = torch.cat([((bits << 16) | 0x7FFF).view(torch.float32), ((bits << 16) | 0x8001).view(torch.float32)])
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 3.4028234e38, -3.4028234e38,
                            1e-40, -1e-40, 1.17549435e-38, 1.0 + 2**-8, 1.0 + 3 * 2**-8])
    payload_nan = torch.tensor([0x7FC12345, 0xFF800001 - (1 << 32)], dtype=torch.int32).view(torch.float32)
    return torch.cat([random_values, ties, near_ties, special, payload_nan]).contiguous()


@interpreting
def test_round_bf16_matches_torch_round_to_nearest_even():
    x = _bf16_test_values()
    got = _run_round(x)
    want = x.to(torch.bfloat16).to(torch.float32)  # torch rounds to nearest, ties to even
    nan = torch.isnan(x)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(got[~nan].view(torch.int32), want[~nan].view(torch.int32))
    # the rounded value is a bf16 value: the interpreter's truncating cast is then exact
    assert torch.equal(got[~nan].view(torch.int32) & 0xFFFF, torch.zeros_like(got[~nan], dtype=torch.int32))


@interpreting
def test_round_bf16_gpu_body_is_the_identity():
    x = _bf16_test_values()
    got = _run_round(x, gpu_body=True)
    nan = torch.isnan(x)
    assert torch.equal(got[~nan].view(torch.int32), x[~nan].view(torch.int32)) and torch.isnan(got[nan]).all()


def test_round_bf16_follows_the_mode_triton_is_in(monkeypatch):
    """One runtime serves both modes: the wrapper is made in the mode Triton is in when it is asked for."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert isinstance(rt.round_bf16_for(True), InterpretedFunction)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert isinstance(rt.round_bf16_for(False), JITFunction)
    assert rt.round_bf16_for(True).fn is rt.round_bf16_interpreter
    assert rt.round_bf16_for(False).fn is rt.round_bf16_gpu


# ----------------------------------------------------------------------------- generated modules


def test_generated_source_imports_the_runtime_instead_of_pasting_it():
    x = torch.randn(4, 8)
    for fn in (lambda a, b: (a * b).to(torch.bfloat16), lambda a, b: torch.softmax(a + b, -1)):
        src = loader.code_of(generate_source(region_from_fn(fn, x, x), "imports"))
        assert "from fxopt.codegen import fused_runtime as rt" in src
        assert "def collapse" not in src and "class TunedKernel" not in src and "def _collapse" not in src
        compile(src, "<generated>", "exec")


@interpreting
def test_one_runtime_serves_modules_of_both_modes(tmp_path, monkeypatch):
    """The same code loaded for the GPU and then for the interpreter in one process: each module gets its
    mode's configs and bf16 rounding, and the interpreter one still computes GPU numerics."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    a, b = torch.randn(37, 19), torch.randn(19)
    region = region_from_fn(lambda a, b: (a * b + 0.5).to(torch.bfloat16), a, b)
    src = generate_source(region, "modes") + "\n# variant for this test\n"  # its own module-cache entries
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("FXOPT_FUSED_AUTOTUNE", "0")
    gpu = loader.load_kernel_module(src, tmp_path)  # decorates only: nothing is compiled
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    interp = loader.load_kernel_module(src, tmp_path)
    assert gpu is not interp and not gpu.INTERPRET and interp.INTERPRET
    assert isinstance(gpu._round_bf16, JITFunction) and isinstance(interp._round_bf16, InterpretedFunction)
    assert len(gpu.POINTWISE_CONFIGS) > 1 and len(interp.POINTWISE_CONFIGS) == 1
    (got,) = interp.launch(a, b)
    assert torch.equal(got, (a * b + 0.5).to(torch.bfloat16))  # rounded to nearest even, bit for bit
