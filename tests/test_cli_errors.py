"""The CLI's error policy: every user mistake exits 2 with `fxopt: error: ...` (no traceback); --debug shows it.

Most cases call `fxopt.cli.main([...])` in-process (no model is captured before the mistake is found);
a few run the installed command in a subprocess, as a user would.
"""

import os
import subprocess
import sys
import time

import pytest
import torch

from fxopt import cli
from fxopt.errors import UserError, user_error

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

HAS_CUDA = torch.cuda.is_available()
NO_GPU = pytest.mark.skipif(HAS_CUDA, reason="checks the refusal on a machine without a GPU")

# (argv, words the message must contain)
BAD = [
    # the command line itself
    ([], "required: COMMAND"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["annotate"], "required: model"),
    (["annotate", "gpt2-tiny", "--bogus"], "unrecognized arguments: --bogus"),
    (["annotate", "gpt2-tiny", "--batch", "x"], "not an integer"),
    # unknown model / hardware / dtype
    (["annotate", "notamodel"], "unknown model 'notamodel'"),
    (["annotate", "gpt2-tny"], "did you mean 'gpt2-tiny'"),
    (["annotate", "nonexist.module:f"], "cannot import 'nonexist.module'"),
    (["annotate", "fxopt.zoo:nope"], "has no 'nope'"),
    (["annotate", "os:getcwd"], "not a torch.nn.Module"),
    (["annotate", "hf:notamodel"], "unknown transformers model type 'notamodel'"),
    (["annotate", "hf:llama,num_hidden_layers"], "no key=value"),
    (["explain", "notamodel"], "unknown model 'notamodel'"),
    (["annotate", "gpt2-tiny", "--hw", "x999"], "unknown hardware 'x999'"),
    (["bench", "gpt2-tiny", "--hw", "x999"], "unknown hardware 'x999'"),
    (["annotate", "gpt2-tiny", "--dtype", "int8"], "--dtype: invalid choice: 'int8'"),
    (["bench", "gpt2-tiny", "--dtype", "int8"], "--dtype: invalid choice: 'int8'"),
    (["generate", "gpt2-tiny", "--dtype", "int8"], "--dtype: invalid choice: 'int8'"),
    # sizes
    (["annotate", "gpt2-tiny", "--batch", "0"], "--batch: must be a positive integer, got 0"),
    (["annotate", "gpt2-tiny", "--batch", "-1"], "--batch: must be a positive integer, got -1"),
    (["annotate", "gpt2-tiny", "--seq", "0"], "--seq: must be a positive integer, got 0"),
    (["annotate", "gpt2-tiny", "--max-rows", "-1"], "--max-rows: must be 0 or more, got -1"),
    (["annotate", "gpt2-small", "--seq", "4096"], "--seq 4096 is past gpt2-small's position table (1024"),
    (["annotate", "gpt2-tiny", "--seq", "100000"], "past gpt2-tiny's position table (128"),
    (["bench", "gpt2-tiny", "--batch", "0"], "--batch: must be a positive integer"),
    (["bench", "gpt2-tiny", "--seq", "-5"], "--seq: must be a positive integer"),
    (["bench", "gpt2-tiny", "--seq", "1024"], "--seq 1024 is past gpt2-tiny's position table (128"),
    (["bench", "gpt2-tiny", "--layers", "0"], "--layers: must be a positive integer"),
    (["bench", "hf:gpt2", "--layers", "2"], "--layers overrides a preset's layer count"),
    (["generate", "gpt2-tiny", "--batch", "0"], "--batch: must be a positive integer"),
    (["generate", "gpt2-tiny", "--new-tokens", "0"], "--new-tokens: must be a positive integer"),
    (["generate", "gpt2-tiny", "--repeat", "0"], "--repeat: must be a positive integer"),
    (["generate", "gpt2-tiny", "--warmup", "-1"], "--warmup: must be 0 or more"),
    (["generate", "gpt2-tiny", "--prompt-len", "100", "--new-tokens", "100"],
     "100 + --new-tokens 100 = 200 is past gpt2-tiny's position table (128"),
    (["generate", "gpt2-tiny", "--prompt-len", "128"], "leaves no room for new tokens"),
    (["generate", "gpt2-tiny", "--max-seq-len", "10"], "--max-seq-len 10 is less than prompt + new tokens"),
    (["explain", "gpt2-tiny", "--seq", "0"], "--seq must be a positive integer, got 0"),
    (["explain", "gpt2-tiny", "--batch", "-1"], "--batch must be a positive integer, got -1"),
    (["explain", "gpt2-tiny", "--seq", "1000"], "--seq 1000 is past gpt2-tiny's position table"),
    # output files
    (["annotate", "gpt2-tiny", "--svg", "/nonexistent/dir/x.svg"], "cannot write --svg /nonexistent/dir/x.svg"),
    (["annotate", "gpt2-tiny", "--json", "/nonexistent/dir/x.json"], "cannot write --json"),
    (["annotate", "gpt2-tiny", "--html", "/"], "it is a directory"),
    (["bench", "gpt2-tiny", "--json", "/nonexistent/dir/x.json"], "cannot write --json"),
    (["generate", "gpt2-tiny", "--json", "/nonexistent/dir/x.json"], "cannot write --json"),
    # models that cannot take a KV cache
    (["generate", "bert-base"], "bert-base is not a causal LM"),
    (["generate", "transformer-tiny"], "cannot take a KV cache"),
    (["generate", "gpt2-tiny", "--device", "tpu"], "unknown --device 'tpu'"),
    # GPU-only commands (checked only where there is no GPU)
    pytest.param(["calibrate"], "calibrate needs a CUDA GPU", marks=NO_GPU),
    pytest.param(["bench", "--suite", "fused"], "bench --suite fused needs a CUDA GPU", marks=NO_GPU),
    pytest.param(["bench", "--suite", "attention"], "needs a CUDA GPU", marks=NO_GPU),
    pytest.param(["bench", "--decode"], "bench --decode needs a CUDA GPU", marks=NO_GPU),
    (["bench", "gpt2-tiny", "--tp", "2"], "--tp 2 is for --decode"),
    (["bench", "--decode", "--rows", "fxopt,vllm"], "bad --rows 'fxopt,vllm': unknown ['vllm']"),
    pytest.param(["annotate", "gpt2-tiny", "--hw", "calibrate"], "--hw calibrate needs a CUDA GPU", marks=NO_GPU),
    pytest.param(["generate", "gpt2-tiny", "--device", "cuda"], "--device cuda needs a CUDA GPU", marks=NO_GPU),
]


def _id(param) -> str:
    argv = param.values[0] if hasattr(param, "values") else param[0]
    return " ".join(argv) or "(nothing)"


@pytest.mark.parametrize(("argv", "expected"), BAD, ids=[_id(p) for p in BAD])
def test_user_mistake_exits_2_with_one_line_error(argv, expected, capsys, monkeypatch):
    monkeypatch.delenv("FXOPT_DEBUG", raising=False)
    start = time.perf_counter()
    code = cli.main(argv)
    elapsed = time.perf_counter() - start
    out, err = capsys.readouterr()
    assert code == 2, (code, out, err)
    errors = [line for line in err.splitlines() if line.startswith("fxopt: error:")]
    assert len(errors) == 1, err
    after = err[err.index("fxopt: error:"):].splitlines()
    assert len(after) <= 2, f"more than two lines: {err}"
    assert expected in err, err
    assert "Traceback" not in out + err
    assert elapsed < 30, f"the mistake took {elapsed:.1f} s to find (is it checked before capture?)"


def test_debug_flag_shows_the_traceback(capsys, monkeypatch):
    monkeypatch.delenv("FXOPT_DEBUG", raising=False)
    with pytest.raises(UserError, match="unknown hardware 'x999'"):
        cli.main(["annotate", "gpt2-tiny", "--hw", "x999", "--debug"])
    with pytest.raises(UserError, match="unknown model"):
        cli.main(["--debug", "annotate", "notamodel"])
    monkeypatch.setenv("FXOPT_DEBUG", "1")
    with pytest.raises(UserError):
        cli.main(["annotate", "notamodel"])


def test_kv_cache_refusal_of_an_hf_encoder_is_a_user_error(capsys, monkeypatch):
    monkeypatch.delenv("FXOPT_DEBUG", raising=False)
    pytest.importorskip("transformers")
    spec = "hf:bert,num_hidden_layers=1,hidden_size=32,num_attention_heads=2,intermediate_size=64,vocab_size=64"
    code = cli.main(["generate", spec, "--quiet"])
    _, err = capsys.readouterr()
    assert code == 2 and "cannot take a KV cache" in err and "bidirectional" in err, err
    assert "Traceback" not in err


def test_known_library_errors_map_to_user_errors_and_bugs_do_not():
    from fxopt.generate import GenerationError
    from fxopt.passes.kv_cache import KVCacheError

    kv = user_error(KVCacheError("kv_cache: cannot insert a KV cache: node `x` is bidirectional"), model="m")
    assert kv is not None and kv.problem == "model 'm' cannot take a KV cache: node `x` is bidirectional"
    assert user_error(GenerationError("generate: prompt too long")) is not None
    assert user_error(ZeroDivisionError("a bug")) is None
    assert user_error(KeyError("a bug")) is None


def test_an_internal_bug_keeps_its_traceback(monkeypatch):
    monkeypatch.delenv("FXOPT_DEBUG", raising=False)

    def boom(args):
        raise ZeroDivisionError("an fxopt bug")

    monkeypatch.setattr(cli, "cmd_calibrate", boom)
    with pytest.raises(ZeroDivisionError):
        cli.main(["calibrate"])


def test_help_shows_the_defaults(capsys):
    for command, words in [("annotate", ["(default: 1)", "(default: fp16)", "(default: h100)"]),
                           ("bench", ["8 on a GPU, 2 on CPU", "1024 on a GPU, 64 on CPU"]),
                           ("generate", ["(default: 128", "(default: 3)", "bf16 on a GPU, fp32 on CPU"])]:
        with pytest.raises(SystemExit) as exit_:
            cli.main([command, "--help"])
        assert exit_.value.code == 0
        out = " ".join(capsys.readouterr().out.split())  # help wraps at the terminal width
        assert all(w in out for w in words), (command, out)


def _fxopt(*args, timeout=300, env=None):
    # as a user runs it: conftest sets TRITON_INTERPRET for the in-process kernel tests
    env = {**{k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FXOPT_DEBUG")}, **(env or {})}
    env["PYTHONWARNINGS"] = "ignore::DeprecationWarning"
    cmd = [sys.executable, "-m", "fxopt.cli", *args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    return proc, time.perf_counter() - start


def test_installed_command_prints_one_line_and_exits_2():
    proc, _ = _fxopt("annotate", "hf:notamodel")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("fxopt: error: unknown transformers model type 'notamodel'"), proc.stderr
    assert len(proc.stderr.splitlines()) == 2 and "e.g." in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


def test_fxopt_debug_env_shows_the_traceback():
    proc, _ = _fxopt("annotate", "gpt2-tiny", "--hw", "x999", env={"FXOPT_DEBUG": "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "unknown hardware" in proc.stderr


@pytest.mark.slow
def test_generate_gpt2_tiny_with_defaults_runs():
    proc, elapsed = _fxopt("generate", "gpt2-tiny")
    assert proc.returncode == 0, proc.stderr
    assert "tokens/s" in proc.stdout
    if not HAS_CUDA:
        assert "prompt 64, 64 new tokens, fp32" in proc.stdout  # capped at gpt2-tiny's 128 positions
        assert "fxopt: capturing gpt2-tiny" in proc.stderr and "done in" in proc.stderr  # progress, not a TTY
    assert elapsed < 90, f"fxopt generate gpt2-tiny took {elapsed:.0f} s"


@pytest.mark.slow
def test_bench_gpt2_tiny_with_defaults_runs_and_says_it_is_cpu_sized():
    proc, elapsed = _fxopt("bench", "gpt2-tiny")
    assert proc.returncode == 0, proc.stderr
    assert "whole forward" in proc.stdout and "speedup_vs_eager" in proc.stdout
    if not HAS_CUDA:
        assert "no GPU: bench runs a CPU-sized configuration" in proc.stderr
        assert "batch=2, seq=64" in proc.stdout
        assert "fxopt: optimizing gpt2-tiny" in proc.stderr and "done in" in proc.stderr
    assert elapsed < 90, f"fxopt bench gpt2-tiny took {elapsed:.0f} s"


def test_quiet_turns_progress_off(capsys):
    code = cli.main(["annotate", "gpt2-tiny", "--seq", "16", "--max-rows", "0", "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0 and "TOTAL" in out
    assert "fxopt:" not in err
    code = cli.main(["annotate", "gpt2-tiny", "--seq", "16", "--max-rows", "0"])
    out, err = capsys.readouterr()
    assert code == 0
    assert "fxopt: capturing gpt2-tiny (b=1, s=16)... done in" in err  # a plain line, stderr is not a TTY
