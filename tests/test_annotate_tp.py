"""`fxopt annotate --tp N` / analyze(tensor_parallel=N): one GPU's costs of a sharded model, with its collectives
priced on the interconnect. References: the model config's sizes (ring all-reduce: each GPU sends 2(N-1)/N of
the tensor) and the unsharded analysis of the same model."""

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fxopt import models
from fxopt.analyze import analyze
from fxopt.cli import main
from fxopt.hardware import get_hardware, measure_all_reduce_bandwidth

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


def _measure_rank(rank: int, world_size: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        link = measure_all_reduce_bandwidth(dist.group.WORLD, nbytes=1 << 20, rounds=5)
        x = torch.full((4,), float(rank + 1))
        dist.all_reduce(x)  # the group still works after the measurement
        torch.save({"link": link, "sum": x}, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_all_reduce_bandwidth_is_measured_on_every_rank(tmp_path):
    """2 gloo ranks on the CPU (NCCL on GPUs: `fxopt calibrate --tp N` under torchrun): a positive, finite bus
    bandwidth on each, far below any NVLink's, and the group left usable."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_measure_rank, (2, port, str(tmp_path)), nprocs=2, start_method="fork")
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for result in results:
        assert 1e6 < result["link"] < get_hardware("h100").interconnect
        assert torch.equal(result["sum"], torch.full((4,), 3.0))


def test_link_gbs_overrides_the_presets_interconnect(capsys):
    assert main(["annotate", "llama-tiny", "--seq", str(S), "--tp", "2", "--link-gbs", "45", "--quiet"]) == 0
    assert "at 45 GB/s" in capsys.readouterr().out
    assert main(["annotate", "llama-tiny", "--tp", "2", "--link-gbs", "-1", "--quiet"]) == 2


def test_calibrate_tp_outside_torchrun_says_how_to_run_it(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # past the GPU check, to the launcher check
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):  # not under torchrun
        monkeypatch.delenv(name, raising=False)
    assert main(["calibrate", "--tp", "2", "--quiet"]) == 2
    assert "torchrun --nproc-per-node 2" in capsys.readouterr().err
