"""Random pointwise/reduction graphs through the fused-kernel generator, vs eager.

Hypothesis draws a small program: 1-4 inputs of broadcastable shapes (full, per-row,
per-column, 0-dim; contiguous, transposed or sliced), fp32/fp16, then 2-8 ops from the
supported table (unary, binary, casts, where/masked_fill, last-dim reductions incl. var/norm, the
composites softmax, log_softmax, layer_norm, rms_norm), and a few of the values as
outputs. The program becomes a Python function, `region_from_fn` exports it, and the
compiled kernel (Triton interpreter) must match eager under the DESIGN.md rule.
"""

import os

import torch

# Before Triton is imported: kernels run in Triton's CPU interpreter. Only without a GPU, so that
# collecting this module on a GPU machine does not switch every other test to the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fxopt.codegen import loader  # noqa: E402
from fxopt.codegen.fused import compile_region, region_from_fn  # noqa: E402

pytestmark = [
    pytest.mark.skipif(not loader.interpreting(), reason="needs TRITON_INTERPRET=1 (CPU interpreter)"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:(var|std)\\(\\).*degrees of freedom:UserWarning"),
]

FLOOR = {torch.float32: 1e-5, torch.float16: 5e-4, torch.bfloat16: 4e-3}

# Ops keep values in a moderate range so fp16 eager never overflows.
UNARY = {
    "neg": lambda a: -a,
    "abs": torch.abs,
    "relu": F.relu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda a: F.gelu(a, approximate="tanh"),
    "sin": torch.sin,
    "erf": torch.erf,
    "exp_tanh": lambda a: torch.exp(torch.tanh(a)),
    "scale": lambda a: a * 0.75,
    "shift": lambda a: a + 0.5,
    "rsqrt1": lambda a: torch.rsqrt(a.abs() + 1.0),
    "log1": lambda a: torch.log(a.abs() + 1.0),
    "square_clamp": lambda a: torch.clamp(a * a, max=4.0),
    "pow3_tanh": lambda a: torch.tanh(a) ** 3,
    "cast_f16": lambda a: a.to(torch.float16).to(a.dtype),
    "upcast": lambda a: a.float(),
}
BINARY = {
    "add": torch.add,
    "sub": torch.sub,
    "mul": lambda a, b: torch.tanh(a) * b,
    "div": lambda a, b: a / (b.abs() + 1.0),
    "maximum": torch.maximum,
    "minimum": torch.minimum,
    "where": lambda a, b: torch.where(a > b, a, b * 0.5),
    "masked_fill": lambda a, b: a.masked_fill(b > 0.8, -1.0),
}
# value -> per-row value (keepdim) or the composite's full output
REDUCE = {
    "sum": lambda a: a.sum(-1, keepdim=True) * 0.25,
    "mean": lambda a: a.mean(-1, keepdim=True),
    "amax": lambda a: a.amax(-1, keepdim=True),
    "amin": lambda a: a.amin(-1, keepdim=True),
    "var": lambda a: a.var(-1, keepdim=True),  # NaN when N == 1 (unbiased): NaN must propagate alike
    "norm": lambda a: a.norm(dim=-1, keepdim=True) * 0.5,
}
COMPOSITE = {
    "softmax": lambda a: torch.softmax(a, -1),
    "log_softmax": lambda a: F.log_softmax(a, -1),
    "layer_norm": lambda a: F.layer_norm(a, a.shape[-1:]),
    "rms_norm": lambda a: F.rms_norm(a, a.shape[-1:], eps=1e-5),
}
# final outputs only: a per-row value without the kept dim
DROP = {
    "sum_drop": lambda a: a.sum(-1),
    "mean_drop": lambda a: a.mean(-1),
    "amax_drop": lambda a: a.amax(-1),
    "std_drop": lambda a: a.std(-1, correction=0),
}


@st.composite
def programs(draw):
    rank = draw(st.integers(1, 3))
    lead = [draw(st.integers(1, 5)) for _ in range(rank - 1)]
    n = draw(st.sampled_from([1, 2, 3, 5, 8, 13]))
    full = tuple(lead) + (n,)
    dtype = draw(st.sampled_from([torch.float32, torch.float16]))
    n_inputs = draw(st.integers(1, 4))
    inputs = []
    for i in range(n_inputs):
        kind = "full" if i == 0 else draw(st.sampled_from(["full", "full", "row", "col", "scalar"]))
        shape = {
            "full": full,
            "row": tuple(lead) + (1,),
            "col": (n,),
            "scalar": (),
        }[kind]
        layout = draw(st.sampled_from(["contiguous", "transposed", "sliced"])) if len(shape) >= 1 else "contiguous"
        in_dtype = dtype if draw(st.integers(0, 4)) else torch.float32
        inputs.append((shape, layout, in_dtype))
    n_ops = draw(st.integers(2, 8))
    ops = []
    zero_dim = [len(shape) == 0 for shape, _, _ in inputs]  # reductions need a dim to reduce
    reductions = 0
    for _ in range(n_ops):
        n_values = len(zero_dim)
        with_dims = [i for i in range(n_values) if not zero_dim[i]]
        kinds = ["unary", "binary", "binary"] + (["reduce", "composite"] if reductions < 2 and with_dims else [])
        kind = draw(st.sampled_from(kinds))
        if kind == "unary":
            a = draw(st.integers(0, n_values - 1))
            ops.append(("unary", draw(st.sampled_from(sorted(UNARY))), a))
            zero_dim.append(zero_dim[a])
        elif kind == "binary":
            a, b = draw(st.integers(0, n_values - 1)), draw(st.integers(0, n_values - 1))
            ops.append(("binary", draw(st.sampled_from(sorted(BINARY))), a, b))
            zero_dim.append(zero_dim[a] and zero_dim[b])
        else:
            reductions += 1
            table = REDUCE if kind == "reduce" else COMPOSITE
            ops.append((kind, draw(st.sampled_from(sorted(table))), draw(st.sampled_from(with_dims))))
            zero_dim.append(False)
    n_values = len(zero_dim)
    extra = draw(st.lists(st.integers(n_inputs, n_values - 1), max_size=2, unique=True))
    outputs = sorted({n_values - 1, *extra})
    drop = None if zero_dim[-1] else draw(st.sampled_from([None, None, *sorted(DROP)]))
    seed = draw(st.integers(0, 2**16))
    loop = draw(st.booleans())  # row kernels: force the loop over column blocks
    return inputs, ops, outputs, drop, seed, loop


def build(program):
    inputs, ops, outputs, drop, seed, _ = program

    def fn(*xs):
        values = list(xs)
        for op in ops:
            if op[0] == "unary":
                values.append(UNARY[op[1]](values[op[2]]))
            elif op[0] == "binary":
                values.append(BINARY[op[1]](values[op[2]], values[op[3]]))
            elif op[0] == "reduce":
                values.append(REDUCE[op[1]](values[op[2]]))
            else:
                values.append(COMPOSITE[op[1]](values[op[2]]))
        outs = [values[i] for i in outputs]
        if drop:
            outs.append(DROP[drop](values[-1]))
        return tuple(outs)

    gen = torch.Generator().manual_seed(seed)
    args = []
    for shape, layout, dtype in inputs:
        if layout == "transposed":
            t = torch.randn(shape[::-1], generator=gen).to(dtype).permute(*reversed(range(len(shape))))
        elif layout == "sliced":
            t = torch.randn(shape[:-1] + (2 * shape[-1],), generator=gen).to(dtype)[..., ::2]
        else:
            t = torch.randn(shape, generator=gen).to(dtype)
        args.append(t)
    return fn, args


def check(got, eager, ref, what):
    assert got.shape == eager.shape and got.dtype == eager.dtype, what
    g, e, r = got.double(), eager.double(), ref.double()
    assert torch.equal(g.isnan(), e.isnan()), f"{what}: NaN pattern"
    ok = ~g.isnan()
    g, e, r = g[ok], e[ok], r[ok]
    if g.numel() == 0:
        return
    factor = 2.0 if got.dtype == torch.float32 else 3.0
    err = (g - r).abs().max().item()
    eager_err = (e - r).abs().max().item()
    bound = factor * eager_err + FLOOR[got.dtype] * max(1.0, r.abs().max().item())
    assert err <= bound, f"{what}: error {err:.3g} > {bound:.3g} (eager {eager_err:.3g})"


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
@given(programs())
def test_random_regions_match_eager(tmp_path_factory, program):
    fn, args = build(program)
    eager = fn(*args)
    ref = fn(*[a.double() for a in args])
    region = region_from_fn(fn, *args)
    kernel = compile_region(region, "fuzz", dump_dir=tmp_path_factory.getbasetemp() / "fuzz")
    module = kernel.module
    saved = getattr(module, "WHOLE_ROW_MAX_N", None)
    if saved is not None and program[-1]:
        module.WHOLE_ROW_MAX_N = 2  # rows of N > 2 go through the multi-pass loop
    try:
        got = kernel(*args)
    finally:
        if saved is not None:
            module.WHOLE_ROW_MAX_N = saved
    if saved is None:
        event("pointwise kernel")
    else:
        event("row kernel, " + ("multi-pass loop" if program[-1] and args[0].shape[-1] > 2 else "whole rows"))
    assert len(got) == len(eager)
    for i, (g, e, r) in enumerate(zip(got, eager, ref)):
        check(g, e, r, f"output {i} of {program}")
