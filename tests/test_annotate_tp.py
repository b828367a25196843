"""`fxopt annotate --tp N` / analyze(tensor_parallel=N): one GPU's costs of a sharded model, with its collectives
priced on the interconnect. References: the model config's sizes (ring all-reduce: each GPU sends 2(N-1)/N of
the tensor) and the unsharded analysis of the same model."""

import json

import pytest

from fxopt import models
from fxopt.analyze import analyze
from fxopt.cli import main
from fxopt.hardware import get_hardware

B, S = 2, 32


def layer(report, name):
    return next(row for row in report["layers"] if row["layer"] == name)


def matmul_flops(report, layer_name):
    return sum(r["flops"] for r in report["nodes"] if r["kind"] == "matmul" and r["layer"] == layer_name)


@pytest.mark.parametrize("world", [2, 4])
def test_link_bytes_per_layer_are_two_ring_all_reduces_of_the_hidden_state(world):
    config = models.PRESETS["llama-tiny"]
    report = analyze("llama-tiny", batch=B, seq=S, hw="h200", tensor_parallel=world).report
    hidden_bytes = B * S * config.d_model * 2  # fp16
    ring = 2 * (world - 1) / world
    assert layer(report, "layers.0")["link_bytes"] == pytest.approx(2 * ring * hidden_bytes)
    parallel = report["tensor_parallel"]
    assert parallel["world_size"] == world and parallel["link_bytes_per_layer"] == pytest.approx(
        2 * ring * hidden_bytes)
    # 2 per layer, the vocab-parallel embedding's all-reduce and the logits' all-gather
    assert parallel["collectives"] == 2 * config.n_layers + 2
    logits = B * S * config.vocab_size * 2
    assert parallel["link_bytes"] == pytest.approx(
        (2 * config.n_layers + 1) * ring * hidden_bytes + (world - 1) / world * logits)
    collectives = [r for r in report["nodes"] if r["kind"] == "collective"]
    assert all(r["bound"] == "interconnect" for r in collectives)  # tiny tensors: the link, not HBM, bounds them
    link = get_hardware("h200").interconnect
    assert parallel["collective_time_s"] == pytest.approx(parallel["link_bytes"] / link, rel=1e-6)


def test_each_gpu_does_its_share_of_the_matmuls_and_holds_its_share_of_the_weights():
    whole = analyze("llama-tiny", batch=B, seq=S, hw="h200").report
    half = analyze("llama-tiny", batch=B, seq=S, hw="h200", tensor_parallel=2).report
    assert matmul_flops(half, "layers.0") == pytest.approx(matmul_flops(whole, "layers.0") / 2)
    parallel = half["tensor_parallel"]
    replicated = parallel["weight_bytes"] - 2 * (parallel["weight_bytes"] - parallel["local_weight_bytes"])
    assert 0 < replicated < 0.1 * parallel["weight_bytes"]  # norms: a few KB stay whole on every GPU
    assert whole.get("tensor_parallel") is None


def test_hf_llama_config_annotates_sharded():
    pytest.importorskip("transformers")
    spec = "hf:llama,hidden_size=128,intermediate_size=256,num_hidden_layers=2,num_attention_heads=4," \
           "num_key_value_heads=2,vocab_size=512"
    report = analyze(spec, batch=1, seq=16, hw="h100", tensor_parallel=2).report
    assert report["tensor_parallel"]["link_bytes_per_layer"] == pytest.approx(2 * 1 * 16 * 128 * 2)


def test_cli_tp_prints_the_communication_and_writes_it_to_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["annotate", "llama-tiny", "--seq", str(S), "--batch", str(B), "--tp", "2", "--json", str(out),
                 "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "tensor parallel over 2 GPUs" in text and "at 450 GB/s" in text  # --hw h100: NVLink 4
    data = json.loads(out.read_text())
    assert data["tensor_parallel"]["world_size"] == 2


def test_cli_tp_that_does_not_divide_the_heads_is_a_clear_error(capsys):
    assert main(["annotate", "llama-tiny", "--tp", "3", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "cannot be sharded over 3 GPUs" in err and "layers.0.self_attn" in err
