"""`fxopt annotate` end to end: the table, JSON, HTML in a real browser, and the 70B acceptance run."""

import json
import shutil
import subprocess
import sys

import pytest

from fxopt import models

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def annotate(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "fxopt.cli", "annotate", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)


def test_annotate_prints_nodes_layers_totals_and_writes_json(tmp_path):
    out = tmp_path / "gpt2.json"
    proc = annotate("gpt2-tiny", "--seq", "64", "--batch", "2", "--hw", "a100-80gb", "--json", str(out))
    report = json.loads(out.read_text())
    assert "TOTAL" in proc.stdout and "blocks.1" in proc.stdout
    assert report["hardware"]["name"] == "A100 80GB SXM"
    assert report["total"]["flops"] == pytest.approx(sum(n["flops"] for n in report["nodes"]), rel=1e-12)
    config = models.PRESETS["gpt2-tiny"]
    b, s, d = 2, 64, config.d_model
    qkv = [n for n in report["nodes"] if n["kind"] == "matmul" and n["shapes"] == [[b, s, 3 * d]]]
    assert qkv and all(n["flops"] == 2 * b * s * d * 3 * d for n in qkv)  # 2·M·N·K, independently
    assert all(n["bound"] in ("compute", "memory", "free", "unknown") for n in report["nodes"])
    assert report["regions"], "annotate outlines the regions fusion would form"
    assert all(r["bytes_after"] < r["bytes_before"] for r in report["regions"])


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs headless chromium")
def test_annotate_html_renders_in_chromium_with_its_roofline(tmp_path):
    from test_report import _chromium, _console_errors, _dom, _root_tag

    page = tmp_path / "llama.html"
    annotate("llama-tiny", "--seq", "64", "--html", str(page))
    shot = tmp_path / "llama.png"
    _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1400,1000", page.as_uri())
    image = pytest.importorskip("matplotlib.image").imread(str(shot))
    assert image[..., :3].std() > 0.05
    dom, stderr = _dom(tmp_path, page.as_uri())
    assert 'id="roofline"' in dom and "<circle" in dom
    assert 'data-fxopt-ready="1"' in _root_tag(dom) and "data-fxopt-error" not in _root_tag(dom)
    assert not _console_errors(stderr)


def test_llama_70b_annotate_totals_match_2_params_tokens_plus_attention(tmp_path):
    """On the meta device (no weights). Its speed is a benchmark's business, not this test's."""
    out = tmp_path / "70b.json"
    annotate("llama-70b-like", "--seq", "4096", "--hw", "h100", "--json", str(out), "--max-rows", "20")
    report = json.loads(out.read_text())
    config = models.PRESETS["llama-70b-like"]
    params = models.param_count(models.build("llama-70b-like", device="meta"))
    tokens, s = 4096, 4096
    attention = config.n_layers * 4 * config.n_heads * s * s * config.head_dim / 2  # causal
    expected = 2 * params * tokens + attention
    assert report["total"]["flops"] == pytest.approx(expected, rel=0.01)
