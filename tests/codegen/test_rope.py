"""fxopt::rope and fxopt::rope_cache_write: the Triton kernel (interpreted on CPU) against a float64 reference.

Tolerance: fxopt.numerics' rule -- the kernel's error against the fp64 reference may be at most 2x (3x for
fp16/bf16) eager-in-that-dtype's error against it. The op's fake implementation must report exactly the
real output's shape, strides and dtype; the dtype is eager's for the traced expression.
"""

from __future__ import annotations

import os

import pytest
import torch
from aot_sm90 import run_script
from torch._subclasses.fake_tensor import FakeTensorMode

from fxopt.codegen import rope as R
from fxopt.numerics import within_tolerance

B, S, H = 2, 7, 3  # odd s: the row blocks end in masked tails

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="needs the Triton interpreter or a GPU")


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def make_x(layout: str, d: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """(b, h, s, d): 'contiguous', or 'transposed' -- a (b, s, h, d) projection output viewed head-first."""
    gen = torch.Generator().manual_seed(seed)
    if layout == "contiguous":
        x = torch.randn(B, H, S, d, generator=gen)
    else:
        x = torch.randn(B, S, H, d, generator=gen).transpose(1, 2)
    return x.to(device=_device(), dtype=dtype)


def make_tables(shape: str, d: int, dtype: torch.dtype, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (not constant) cos/sin shaped (s, d) or (b, 1, s, d)."""
    gen = torch.Generator().manual_seed(seed)
    size = (S, d) if shape == "sd" else (B, 1, S, d)
    cos, sin = torch.randn(size, generator=gen), torch.randn(size, generator=gen)
    return cos.to(device=_device(), dtype=dtype), sin.to(device=_device(), dtype=dtype)


def fp64(x, cos, sin) -> torch.Tensor:
    return R.rope_reference(x.double(), cos.double(), sin.double())


def assert_within_rule(out: torch.Tensor, x, cos, sin) -> None:
    eager = R.rope_reference(x, cos, sin)
    assert out.dtype == eager.dtype and out.shape == eager.shape
    ok, error, allowed = within_tolerance(out, eager, fp64(x, cos, sin))
    assert ok, f"error {error:.3g} > allowed {allowed:.3g}"


# --------------------------------------------------------------------------------------------- the kernel
@pytest.mark.parametrize("d", [64, 80, 128])
@pytest.mark.parametrize("tables", ["sd", "b1sd"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernel_matches_fp64_reference(dtype, layout, tables, d):
    x = make_x(layout, d, dtype)
    cos, sin = make_tables(tables, d, dtype)
    out = R.rope(x, cos, sin)
    assert R.kernel_unsupported(x, cos, sin, out.dtype) is None  # the kernel ran, not the fallback
    assert_within_rule(out, x, cos, sin)
    assert out.stride() == torch.empty_like(x).stride()  # x's dim order, dense


@pytest.mark.parametrize("config", [(1, 1), (4, 2), (16, 4)])
def test_kernel_tiles_and_masked_tails(config):
    """Row blocks that do not divide b*h*s, and a head dim (80) padded to a 64-wide half block."""
    x = make_x("transposed", 80, torch.float32)
    cos, sin = make_tables("b1sd", 80, torch.float32)
    assert_within_rule(R.rope(x, cos, sin, config=config), x, cos, sin)


def test_kernel_strided_tables_and_rank3():
    """cos/sin as strided views (a slice of a wider table, an expanded row), x of rank 3 with a strided
    last dim: every operand goes through its own strides."""
    gen = torch.Generator().manual_seed(3)
    d = 64
    x = torch.randn(S, 5, 2 * d, generator=gen)[..., ::2].transpose(0, 1).to(_device())  # (5, s, d), stride 2
    wide = torch.randn(S, 2 * d, generator=gen).to(_device())
    cos = wide[:, :d]  # row stride 2d
    sin = torch.randn(1, d, generator=gen).to(_device()).expand(S, d)  # stride 0 rows
    out = R.rope(x, cos, sin)
    assert_within_rule(out, x, cos, sin)


@pytest.mark.parametrize("x_dtype, table_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float16),
                                                  (torch.float16, torch.bfloat16)])
def test_mixed_dtypes_follow_eager_promotion(x_dtype, table_dtype):
    """bf16 x with fp32 tables is fp32 in eager (x * cos promotes): so is the kernel's output."""
    x = make_x("transposed", 64, x_dtype)
    cos, sin = make_tables("sd", 64, table_dtype)
    out = R.rope(x, cos, sin)
    assert out.dtype == (x * cos).dtype == torch.promote_types(x_dtype, table_dtype)
    assert_within_rule(out, x, cos, sin)


def test_zero_dim_tables_do_not_promote():
    x = make_x("contiguous", 64, torch.bfloat16)
    cos, sin = torch.tensor(0.3, device=x.device), torch.tensor(-0.7, device=x.device)  # fp32, 0-dim
    out = R.rope(x, cos, sin)
    assert out.dtype == R.rope_reference(x, cos, sin).dtype == torch.bfloat16
    assert_within_rule(out, x, cos, sin)


def test_collapse_rows():
    x = torch.empty(2, 3, 5, 8)
    assert R.collapse_rows(x.shape, [x.stride()]) == [(30, [8])]  # contiguous: one row dim
    t = torch.empty(2, 5, 3, 8).transpose(1, 2)
    cos = torch.empty(5, 8).expand(2, 3, 5, 8)
    lead = R.collapse_rows(t.shape, [t.stride(), cos.stride()])
    assert [n for n, _ in lead] == [2, 3, 5]  # heads and positions swapped in memory: nothing merges
    one = torch.empty(1, 3, 1, 8)
    assert R.collapse_rows(one.shape, [one.stride()]) == [(3, [8])]  # size-1 dims dropped


def test_int64_indexing_decided_by_reach():
    small = torch.empty(4, 8, device="meta")
    big_rows = torch.empty_strided((2, 8), (2**31, 1), device="meta")  # the second row starts past 2^31
    assert not R._needs_int64([small])
    assert R._needs_int64([small, big_rows])


def eager_partial(x, cos, sin) -> torch.Tensor:
    """HF's partial rotary, written out independently of the op: rotate the tables' columns, pass the rest."""
    r = cos.shape[-1]
    x_rot, x_pass = x[..., :r], x[..., r:]
    half = r // 2
    rotated = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
    return torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1)


@pytest.mark.parametrize("d, r", [(64, 16), (80, 32), (128, 64), (96, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_partial_rotary_rotates_the_tables_columns_and_copies_the_rest(dtype, d, r):
    """GPT-NeoX / Phi / StableLM: tables of r < d columns; the d - r others are x itself, bit for bit."""
    x = make_x("transposed", d, dtype)
    cos, sin = make_tables("b1sd", r, torch.float32)
    out = R.rope(x, cos, sin)
    assert R.kernel_unsupported(x, cos, sin, out.dtype) is None
    eager = eager_partial(x, cos, sin)
    assert out.dtype == eager.dtype and out.shape == x.shape
    assert torch.equal(out[..., r:], eager[..., r:])
    ok, error, allowed = within_tolerance(out[..., :r], eager[..., :r], fp64(x[..., :r], cos, sin))
    assert ok, f"error {error:.3g} > allowed {allowed:.3g}"
    torch.testing.assert_close(R.rope_reference(x, cos, sin), eager, rtol=0, atol=0)


def eager_every_two(x, cos_half, sin_half) -> torch.Tensor:
    """HF GPT-J's spelling, written out independently of the op: tables of r/2 frequencies repeated to r,
    rotate_every_two over x's first r columns, the rest passed."""
    cos, sin = (torch.repeat_interleave(t, 2, -1) for t in (cos_half, sin_half))
    r = cos.shape[-1]
    x_rot, x_pass = x[..., :r], x[..., r:]
    rotated = torch.stack((-x_rot[..., 1::2], x_rot[..., ::2]), dim=-1).flatten(-2)
    return torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1)


@pytest.mark.parametrize("d, r", [(64, 64), (16, 8), (80, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_adjacent_pairs_are_gptj_rotate_every_two(dtype, d, r):
    x = make_x("transposed", d, dtype)
    cos_half, sin_half = make_tables("b1sd", r // 2, torch.float32)
    cos, sin = (torch.repeat_interleave(t, 2, -1) for t in (cos_half, sin_half))
    out = R.rope(x, cos, sin, adjacent=True)
    eager = eager_every_two(x, cos_half, sin_half)
    assert out.dtype == eager.dtype and torch.equal(out[..., r:], eager[..., r:])
    exact = eager_every_two(x.double(), cos_half.double(), sin_half.double())
    ok, error, allowed = within_tolerance(out, eager, exact)
    assert ok, f"error {error:.3g} > allowed {allowed:.3g}"
    torch.testing.assert_close(R.rope_reference(x, cos, sin, adjacent=True), eager, rtol=0, atol=0)
    assert not torch.allclose(out, R.rope(x, cos, sin))  # the pairing matters: half-split differs


def test_partial_rotary_cache_write():
    d, r, n, L = 64, 16, 2, 8
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(1, n, H, d, generator=gen).transpose(1, 2).to(_device())  # (1, h, n, d)
    cos, sin = (torch.randn(1, 1, n, r, generator=gen).to(_device()) for _ in range(2))
    cache = torch.zeros(1, H, L, d, device=_device(), dtype=torch.bfloat16)
    R.rope_cache_write(cache, x, cos, sin, torch.tensor(3, device=x.device))
    assert R.cache_write_unsupported(cache, x, cos, sin, torch.tensor(3)) is None
    torch.testing.assert_close(cache[:, :, 3:3 + n], eager_partial(x, cos, sin).to(torch.bfloat16))
    assert not cache[:, :, :3].any() and not cache[:, :, 3 + n:].any()


# --------------------------------------------------------------------------------------------- rope_cache_write
@pytest.mark.parametrize("pos_kind", ["start", "slots"])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_cache_write_kernel_matches_reference(pos_kind, cache_dtype):
    d, n, L = 80, 3, 16
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(B, n, H, d, generator=gen).transpose(1, 2).to(_device())  # (b, h, n, d), transposed view
    cos, sin = (torch.randn(B, 1, n, d, generator=gen).to(_device()) for _ in range(2))
    cache = torch.randn(B, H, L, d, generator=gen).to(device=_device(), dtype=cache_dtype)
    pos = torch.tensor(6, device=x.device)
    if pos_kind == "slots":
        pos = pos + torch.arange(n, device=x.device)
    expected = cache.clone()
    expected[:, :, 6:6 + n] = R.rope_reference(x, cos, sin).to(cache_dtype)
    R.rope_cache_write(cache, x, cos, sin, pos)
    assert R.cache_write_unsupported(cache, x, cos, sin, pos) is None
    untouched = torch.ones(L, dtype=torch.bool)
    untouched[6:6 + n] = False
    assert torch.equal(cache[:, :, untouched], expected[:, :, untouched])  # other slots exactly as they were
    written = cache[:, :, 6:6 + n]
    eager = expected[:, :, 6:6 + n]
    ok, error, allowed = within_tolerance(written, eager, fp64(x, cos, sin))
    assert ok, f"error {error:.3g} > allowed {allowed:.3g}"


def test_cache_write_op_on_a_batch_slice_of_the_cache():
    """The generator passes caches[:b] of a max_batch cache: the rows beyond b stay untouched."""
    d, n = 64, 1
    gen = torch.Generator().manual_seed(6)
    full = torch.randn(3, H, 8, d, generator=gen).to(_device())
    before = full.clone()
    x = torch.randn(2, H, n, d, generator=gen).to(_device())
    cos, sin = (torch.randn(2, 1, n, d, generator=gen).to(_device()) for _ in range(2))
    torch.ops.fxopt.rope_cache_write(full[:2], x, cos, sin, torch.tensor([4], device=x.device))
    assert torch.equal(full[2], before[2])
    torch.testing.assert_close(full[:2, :, 4:5], R.rope_reference(x, cos, sin))


# --------------------------------------------------------------------------------------------- the op and its fake
CASES = {
    "contiguous_fp32": (lambda: make_x("contiguous", 64, torch.float32), "sd", torch.float32),
    "transposed_bf16": (lambda: make_x("transposed", 64, torch.bfloat16), "b1sd", torch.bfloat16),
    "transposed_bf16_fp32_tables": (lambda: make_x("transposed", 80, torch.bfloat16), "sd", torch.float32),
    "rank3_permuted": (lambda: torch.randn(S, 4, 64).permute(1, 0, 2).to(_device()), "sd", torch.float32),
    "expanded_x": (lambda: torch.randn(1, 1, S, 64).to(_device()).expand(B, H, S, 64), "b1sd", torch.float32),
}


@pytest.mark.parametrize("interpret_ops", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_fake_matches_real_layout_and_dtype(case, interpret_ops, monkeypatch):
    """meta['val'] must be exact: the fake's shape, strides and dtype equal the real output's, whether the
    op runs the kernel (FXOPT_INTERPRET_OPS=1) or the CPU reference."""
    monkeypatch.setenv("FXOPT_INTERPRET_OPS", "1" if interpret_ops else "0")
    make, tables, table_dtype = CASES[case]
    x = make()
    d = x.shape[-1]
    cos, sin = make_tables(tables, d, table_dtype)
    real = torch.ops.fxopt.rope(x, cos, sin)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = torch.ops.fxopt.rope(mode.from_tensor(x), mode.from_tensor(cos), mode.from_tensor(sin))
    assert (tuple(fake.shape), fake.stride(), fake.dtype) == (tuple(real.shape), real.stride(), real.dtype)
    assert real.dtype == R.rope_reference(x, cos, sin).dtype
    assert_within_rule(real, x, cos, sin)


def test_op_refuses_bad_inputs():
    x = make_x("contiguous", 64, torch.float32)
    cos, sin = make_tables("sd", 64, torch.float32)
    with pytest.raises(ValueError, match="even"):
        torch.ops.fxopt.rope(x[..., :63], cos[..., :63], sin[..., :63])
    with pytest.raises(ValueError, match="even"):  # partial rotary over an odd number of columns
        torch.ops.fxopt.rope(x, cos[..., :15], sin[..., :15])
    with pytest.raises(ValueError, match="broadcast"):
        torch.ops.fxopt.rope(x[:, :1], torch.randn(B, H, S, 64, device=x.device), sin)  # would grow x


def test_decode_sized_launch_spreads_rows():
    """A decode step's q (32 heads x 1 token) runs on many small programs, a prefill on big tiles."""
    block_r, _ = R.default_config(64, 32)
    assert block_r == 1
    block_r, warps = R.default_config(64, 1 << 16)
    assert block_r * 2 * 64 >= 2048 and warps >= 4


# --------------------------------------------------------------------------------------------- sm_90 compile
_AOT_SCRIPT = r"""
from fxopt.codegen import rope as R

def signature(ptr, slots):
    out = {}
    for p in R._rope_kernel.params:
        if p.is_constexpr:
            out[p.name] = "constexpr"
        elif p.name in ("X", "COS", "SIN", "OUT"):
            out[p.name] = ptr
        elif p.name == "SLOTS":
            out[p.name] = "*i64" if slots else ptr
        else:
            out[p.name] = "i32"
    return out

for ptr in ("*bf16", "*fp32"):
    for slots in (False, True):
        for index_64 in (False, True):
            constexprs = dict(HALF=40, BLOCK_H=64, BLOCK_R=16, HAS_SLOTS=slots, INDEX_64=index_64,
                              PDL=index_64,  # the PDL variant too (griddepcontrol.* before the loads)
                              PASS=48 if slots else 0, BLOCK_P=64,  # partial rotary (the copied columns) too
                              ADJACENT=slots and not index_64)  # and GPT-J's adjacent pairs
            k = compile_sm90(R._rope_kernel, signature(ptr, slots), constexprs, num_warps=4)
            assert "st.global" in k.asm["ptx"]
            assert ("griddepcontrol.wait" in k.asm["ptx"]) == index_64
            print("compiled rope", ptr, slots, index_64)

copy_sig = {p.name: ("*i64" if p.name == "SLOTS" else "*bf16" if p.name in ("X", "OUT") else "i32")
            for p in R._slot_copy_kernel.params if not p.is_constexpr}
k = compile_sm90(R._slot_copy_kernel, copy_sig, dict(D=128, BLOCK_D=128, BLOCK_R=32, PDL=True), num_warps=4)
assert "griddepcontrol.wait" in k.asm["ptx"] and "st.global" in k.asm["ptx"]
print("compiled slot copy")
"""


def test_rope_kernel_compiles_for_sm90_without_a_gpu(tmp_path):
    out = run_script(tmp_path, "aot_rope", _AOT_SCRIPT)
    assert out.count("compiled rope") == 8 and "compiled slot copy" in out


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_slot_copy_writes_strided_rows_at_the_slots(cache_dtype):
    """The V cache write: cache[:, :, slots] = x for a head-first view of a projection, against index_copy_."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 3, 24, generator=gen).transpose(1, 2).to(_device(), cache_dtype)  # (b, h, n, d) view
    cache = torch.randn(2, 3, 10, 24, generator=gen).to(device=_device(), dtype=cache_dtype)
    slots = torch.tensor([7, 2, 4], device=_device())
    expected = cache.clone().index_copy_(2, slots, x.to(cache_dtype))
    R.slot_copy(cache, x, slots)
    assert torch.equal(cache, expected)
