"""Real architectures on CUDA, with the kernels themselves (not their references): sliding-window Mistral,
soft-capped, alternating local/global Gemma-2, the ALiBi models (Bloom's 3-d baddbmm attention, Falcon's
in-place scaled scores) and partial rotary (GPT-NeoX's interleaved q/k/v rows, StableLM), optimized and
KV-cached, checked by verify=True at a length past the window and by
HF generate's greedy tokens in fp32.

Skipped without a GPU (tests/gpu/conftest.py) or without transformers.
"""

from __future__ import annotations

import pytest
import torch

import fxopt

transformers = pytest.importorskip("transformers")
DEVICE = "cuda"
COMMON = dict(num_hidden_layers=2, hidden_size=256, intermediate_size=512, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=1024, max_position_embeddings=512)
ARCHS = {  # name: (model_type, config fields, attention implementation, what every attention node records)
    "mistral-window-64": ("mistral", dict(sliding_window=64), "sdpa", "window"),
    "gemma2-softcap-window-64": ("gemma2", dict(head_dim=64, sliding_window=64, attn_logit_softcapping=50.0,
                                                final_logit_softcapping=30.0), "eager", "window"),
    "bloom-alibi": ("bloom", dict(pad_token_id=0), "eager", "alibi"),
    "falcon-alibi": ("falcon", dict(alibi=True, new_decoder_architecture=False, multi_query=False,
                                    parallel_attn=False, bias=True, pad_token_id=0), "eager", "alibi"),
    # partial rotary: one fxopt::rope per q and k in the forward, folded into gemv_qkv in the decode step
    "gpt_neox-rotary-0.25": ("gpt_neox", dict(rotary_pct=0.25), "sdpa", "partial rotary"),
    "stablelm-rotary-0.25": ("stablelm", dict(partial_rotary_factor=0.25), "sdpa", "partial rotary"),
    "phi-rotary-0.5": ("phi", dict(partial_rotary_factor=0.5), "sdpa", "partial rotary"),  # q/k/v merged with fc1
    "gptj-rotary-32": ("gptj", dict(rotary_dim=32, n_layer=2, n_embd=256, n_head=4, n_inner=512, n_positions=512),
                       "eager", "partial rotary"),  # rotate_every_two's adjacent pairs
    # q/k/v rows grouped per KV head ([q, q; k; v]), in-place mlp_output += attention_output
    "falcon-grouped-qkv": ("falcon", dict(new_decoder_architecture=True, num_kv_heads=2, alibi=False,
                                          parallel_attn=True, bias=False, pad_token_id=0), "sdpa", "rotary"),
}


def build(name: str, dtype: torch.dtype):
    model_type, extra, impl, _ = ARCHS[name]
    config = transformers.AutoConfig.for_model(model_type, **COMMON, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=impl)
    return model.to(DEVICE, dtype).eval()


@pytest.mark.parametrize("name", list(ARCHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_verifies_past_the_window(name, dtype):
    model = build(name, dtype)
    ids = torch.randint(0, 1024, (2, 48), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(1))
    fast = fxopt.optimize(model, {"input_ids": ids}, verify=True)  # 48 and 96 > window 64, generated kernels
    assert "48 and 96" in fast.verification and "generated kernels" in fast.verification
    infos = [n.meta["fxopt.attention"] for n in fast.gm.graph.nodes if "fxopt.attention" in n.meta]
    assert len(infos) >= 2 and all(info.kernel != "sdpa" for info in infos), infos
    if ARCHS[name][3] == "window":
        assert 64 in {info.window for info in infos}
    elif ARCHS[name][3] == "alibi":
        assert all(info.alibi for info in infos)
    else:
        ropes = [n for n in fast.gm.graph.nodes if n.target is torch.ops.fxopt.rope.default]
        assert len(ropes) == 2 * model.config.num_hidden_layers
        if ARCHS[name][3] == "partial rotary":
            assert all(n.args[1].meta["val"].shape[-1] < n.args[0].meta["val"].shape[-1] for n in ropes)


@pytest.mark.parametrize("name", list(ARCHS))
def test_kv_cached_greedy_equals_hf_generate(name):
    model = build(name, torch.float32)
    ids = torch.randint(0, 1024, (1, 40), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(2))
    gen = fxopt.optimize(model, {"input_ids": ids}, kv_cache=True, max_seq_len=256, verify=True)
    ours = gen.generate(ids, max_new_tokens=80)  # the window slides past the prompt during decode
    ref = model.generate(ids, max_new_tokens=80, min_new_tokens=80, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.cpu(), ref.cpu())
