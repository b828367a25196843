"""codegen/tuning.py: one config per key, timed once per key and device when tuning, cached on disk."""

import math
import types

import pytest
import torch
import triton

from fxopt import config
from fxopt.codegen import tuning
from fxopt.codegen.tuning import TunedKernel


class FakeKernel:
    """Records launches like `kernel[grid](*args, **kwargs)`."""

    arg_names = ["x_ptr", "n", "n_bucket", "BLOCK"]

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((grid, args, kwargs))


CONFIGS = [triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((64, 4), (128, 8), (256, 2))]
X = torch.empty(4)


@pytest.fixture
def timed_on_cpu(monkeypatch, tmp_path):
    """Let the tuner time on CPU, with a do_bench whose time per config the test sets; dump dir in tmp."""
    times: dict[int, float] = {}
    benched: list[int] = []

    def fake_do_bench(fn, warmup, rep):
        fn()  # the launch under test: the fake kernel records it
        block = kernel_under_test[-1].launches[-1][2]["BLOCK"]
        benched.append(block)
        if times[block] == math.inf:
            raise triton.OutOfResources(1, 0, "shared memory")
        return times[block]

    kernel_under_test: list[FakeKernel] = []
    monkeypatch.setattr(tuning, "do_bench", fake_do_bench)
    monkeypatch.setattr(tuning, "can_time", lambda device: True)
    with config.override(dump_dir=tmp_path):
        yield times, benched, kernel_under_test


def test_untuned_runs_the_first_pruned_config_once_per_key():
    calls = []

    def prune(configs, named_args, **kwargs):
        bucket = named_args.get("n_bucket", kwargs.get("n_bucket"))
        calls.append(bucket)
        return configs[::-1] if bucket > 100 else configs

    fn = FakeKernel()
    kernel = TunedKernel(fn, CONFIGS, key=["n_bucket"], prune=prune, family="test")
    for bucket in (64, 64, 512, 64, 512):
        kernel[(1,)](X, bucket - 1, bucket)
    kernel[(2,)](X, 7, n_bucket=512)  # the key given by name: still the choice made for 512
    assert calls == [64, 512]
    assert [(kw["BLOCK"], kw["num_warps"]) for _, _, kw in fn.launches] == [
        (64, 4), (64, 4), (256, 2), (64, 4), (256, 2), (256, 2)]
    assert fn.launches[-1][0] == (2,) and fn.launches[-1][1] == (X, 7)


def test_the_key_includes_dtypes():
    fn = FakeKernel()
    kernel = TunedKernel(fn, CONFIGS, key=["n_bucket"], prune=lambda c, a, **k: c, family="test")
    kernel[(1,)](X, 3, 4)
    kernel[(1,)](X.half(), 3, 4)
    assert len(kernel.chosen) == 2


def test_tuning_keeps_the_fastest_and_skips_configs_that_do_not_fit(timed_on_cpu):
    times, benched, under_test = timed_on_cpu
    times.update({64: 3.0, 128: math.inf, 256: 1.0})
    fn = FakeKernel()
    under_test.append(fn)
    kernel = TunedKernel(fn, CONFIGS, key=["n_bucket"], family="test", tune=True)
    kernel[(1,)](X, 3, 4)
    kernel[(1,)](X, 3, 4)
    assert benched == [64, 128, 256]  # each candidate timed once, for the first launch of the key
    assert fn.launches[-1][2]["BLOCK"] == 256 and fn.launches[-2][2]["BLOCK"] == 256


def test_a_tuned_choice_is_read_back_from_disk_by_the_next_process(timed_on_cpu, tmp_path):
    times, benched, under_test = timed_on_cpu
    times.update({64: 2.0, 128: 1.0, 256: 3.0})
    first = FakeKernel()
    under_test.append(first)
    TunedKernel(first, CONFIGS, key=["n_bucket"], family="test", tune=True)[(1,)](X, 3, 4)
    assert (tmp_path / "tuning" / "test.json").exists()
    benched.clear()
    second = FakeKernel()  # a fresh wrapper: what a new process would build
    under_test.append(second)
    TunedKernel(second, CONFIGS, key=["n_bucket"], family="test", tune=True)[(1,)](X, 3, 4)
    assert benched == [] and second.launches[-1][2]["BLOCK"] == 128
    TunedKernel(second, CONFIGS, key=["n_bucket"], family="test", tune=True)[(1,)](X, 3, 8)  # a new bucket
    assert benched == [64, 128, 256]


def test_tune_by_knob_is_read_when_a_key_is_first_seen(timed_on_cpu):
    times, benched, under_test = timed_on_cpu
    times.update({64: 2.0, 128: 1.0, 256: 3.0})
    fn = FakeKernel()
    under_test.append(fn)
    kernel = TunedKernel(fn, CONFIGS, key=["n_bucket"], family="test", tune="rope_autotune")
    with config.override(rope_autotune=False):
        kernel[(1,)](X, 3, 4)
    with config.override(rope_autotune=True):
        kernel[(1,)](X, 3, 16)
    assert benched == [64, 128, 256]
    assert fn.launches[0][2]["BLOCK"] == 64 and fn.launches[-1][2]["BLOCK"] == 128


def test_pre_hook_sees_the_named_arguments_and_the_config():
    seen = []
    configs = [triton.Config({"BLOCK": 32}, num_warps=4, pre_hook=lambda nargs: seen.append(dict(nargs)))]
    fn = FakeKernel()
    TunedKernel(fn, configs, key=["n_bucket"], family="test")[(1,)](X, 5, 8)
    assert seen[0]["n"] == 5 and seen[0]["n_bucket"] == 8 and seen[0]["BLOCK"] == 32 and seen[0]["x_ptr"] is X


def test_no_fitting_config_is_an_error_naming_the_family():
    kernel = TunedKernel(FakeKernel(), CONFIGS, key=["n_bucket"], prune=lambda c, a, **k: [], family="rope")
    with pytest.raises(ValueError, match="rope"):
        kernel[(1,)](X, 3, 4)


def test_every_kernel_family_runs_through_the_tuner():
    from fxopt.codegen import flash_attention, gemv, rope

    for kernel in (flash_attention._flash_attn_fwd_tuned, gemv._gemv_tuned, gemv._gemv_qkv_tuned,
                   rope._rope_kernel_tuned):
        assert isinstance(kernel, TunedKernel)


def test_gemv_candidates_put_the_default_first_with_its_even_k_flag():
    from fxopt.codegen import gemv

    k = 1536
    first, *rest = gemv._gemv_candidates(k, glu=False)
    default = gemv.default_config(0, k)
    assert (first.kwargs["BLOCK_N"], first.kwargs["BLOCK_K"]) == (default.kwargs["BLOCK_N"],
                                                                    default.kwargs["BLOCK_K"])
    for c in (first, *rest):
        assert c.kwargs["EVEN_K"] == (k % c.kwargs["BLOCK_K"] == 0)
    assert len({gemv._tile(c) for c in (first, *rest)}) == len(rest) + 1


# ----------------------------------------------------------------------------- direct launches


class FakeParam:
    def __init__(self, name, default=None, has_default=False):
        self.name, self.default, self.has_default = name, default, has_default


class FakeCompiled:
    """What Triton's launch returns: a loaded kernel whose launcher `run` the direct path calls."""

    function = "cu-function"
    packed_metadata = ("meta",)

    def __init__(self):
        self.runs = []

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, *args):
        self.runs.append(args)


class CompilingKernel(FakeKernel):
    """A FakeKernel with parameters (the last one defaulted) that returns one compiled kernel per launch."""

    arg_names = ["x_ptr", "n", "FLAG", "BLOCK", "EXTRA"]
    params = [FakeParam("x_ptr"), FakeParam("n"), FakeParam("FLAG"), FakeParam("BLOCK"),
              FakeParam("EXTRA", default=7, has_default=True)]

    def __init__(self):
        super().__init__()
        self.compiled = FakeCompiled()

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((grid, args, kwargs))
            return self.compiled

        return launch


@pytest.fixture
def fake_driver(monkeypatch):
    class Active:
        device = 0

        def get_current_device(self):
            return self.device

        def get_current_stream(self, device):
            return f"stream{device}"

    active = Active()
    monkeypatch.setattr(tuning, "driver", types.SimpleNamespace(active=active))
    return active


def test_a_repeated_signature_calls_the_compiled_launcher_with_the_constexpr_tail(fake_driver):
    fn = CompilingKernel()
    hooked = []
    configs = [triton.Config({"BLOCK": 64}, num_warps=4, pre_hook=lambda named: hooked.append(named["BLOCK"]))]
    kernel = TunedKernel(fn, configs, key=["n"], family="test")
    x = torch.empty(64)
    grid = lambda meta: (triton.cdiv(meta["n"], meta["BLOCK"]), 3)  # noqa: E731
    kernel[grid](x, 200, FLAG=True)
    assert len(fn.launches) == 1 and fn.compiled.runs == []
    kernel[grid](x, 200, FLAG=True)  # same signature: Triton's launch is skipped
    y = torch.empty(64)  # another tensor of the same dtype, shape and alignment: same signature
    kernel[grid](y, 200, FLAG=True)
    assert len(fn.launches) == 1
    assert fn.compiled.runs == [
        (4, 3, 1, "stream0", "cu-function", ("meta",), None, None, None, t, 200, True, 64, 7) for t in (x, y)]
    assert hooked == [64, 64, 64]  # the config's pre-hook ran on every launch


def test_a_new_value_alignment_or_device_goes_through_triton(fake_driver):
    fn = CompilingKernel()
    kernel = TunedKernel(fn, CONFIGS[:1], key=["n"], family="test")
    x = torch.empty(64)
    kernel[(1,)](x, 16, FLAG=False)
    kernel[(1,)](x, 17, FLAG=False)  # an int's value (Triton specialises on it)
    kernel[(1,)](x, 16, FLAG=True)  # a constexpr
    kernel[(1,)](x[1:], 16, FLAG=False)  # 4 bytes past a 16-byte boundary
    kernel[(1,)](x.half(), 16, FLAG=False)  # a dtype
    kernel[(1,)](x[4:], 16, FLAG=False)  # 16 bytes in: aligned, but another shape
    assert len(fn.launches) == 6 and fn.compiled.runs == []
    kernel[(1,)](x, 16, FLAG=False)
    assert len(fn.launches) == 6 and len(fn.compiled.runs) == 1
    fake_driver.device = 1
    kernel[(1,)](x, 16, FLAG=False)  # another current device
    assert len(fn.launches) == 7 and len(fn.compiled.runs) == 1


def test_values_that_hash_alike_but_differ_in_type_go_through_triton(fake_driver):
    """1, 1.0 and True are equal keys in Python; Triton compiles them as i32, fp32 and i1."""
    fn = CompilingKernel()
    kernel = TunedKernel(fn, CONFIGS[:1], key=["n"], family="test")
    x = torch.empty(64)
    for n in (1, 1.0, True):
        kernel[(1,)](x, n, FLAG=False)
    for flag in (1, True):
        kernel[(1,)](x, 2, FLAG=flag)
    assert len(fn.launches) == 5 and fn.compiled.runs == []


def test_no_direct_launch_is_recorded_or_used_in_a_dry_run(fake_driver):
    fn = CompilingKernel()
    kernel = TunedKernel(fn, CONFIGS[:1], key=["n"], family="test")
    x = torch.empty(64)
    with tuning.dry_run():
        kernel[(1,)](x, 16, FLAG=False)
    assert kernel.direct == {}
    kernel[(1,)](x, 16, FLAG=False)
    with tuning.dry_run():
        kernel[(1,)](x, 16, FLAG=False)
    assert len(fn.launches) == 3 and fn.compiled.runs == []


def test_the_interpreter_records_nothing():
    fn = FakeKernel()  # its launches return None, as the interpreter's do
    kernel = TunedKernel(fn, CONFIGS[:1], key=["n_bucket"], family="test")
    for _ in range(2):
        kernel[(1,)](X, 3, 4)
    assert len(fn.launches) == 2 and kernel.direct == {}
