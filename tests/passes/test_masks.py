"""The mask analysis proves a mask's form from its graph; verify=True can fail.

Independent references: the definitions of the mask forms (causal: j <= i; window w: i - w < j <= i;
padding: the key's flag), each written in the test as an explicit boolean matrix, and the eager model.
The key cases are masks that look causal at the capture length: a window wider than the capture
sequence must still be proved a window (a sampling check at lengths below the width calls it causal).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import fxopt
from fxopt import numerics
from fxopt.capture import capture
from fxopt.passes import attention, masks

ATTN = torch.ops.fxopt.attention.default


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class Scored(nn.Module):
    """x (b, s, 32) -> 4 heads of 8 -> `hidden(s)` applied with masked_fill -> (b, s, 32)."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(32, 96)
        self.o = nn.Linear(32, 32)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, 4, 8).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-1, -2)) * 8**-0.5
        bias = self.bias(q, s)
        if bias is not None:
            scores = scores + bias
        probs = torch.softmax(scores.masked_fill(self.hidden(s, x.device), float("-inf")), dim=-1)
        return self.o((probs @ v).transpose(1, 2).reshape(b, s, 32))

    def bias(self, q, s):
        return None

    def hidden(self, s, device):
        raise NotImplementedError


class ArangeWindow(Scored):
    """A window of 12 keys spelled with aranges: looks causal at every length <= 12."""

    def hidden(self, s, device):
        i = torch.arange(s, device=device)
        return (i[None, :] > i[:, None]) | (i[:, None] - i[None, :] >= 12)


class TriuWindow(Scored):
    """The same band spelled with tril/triu of a ones matrix."""

    def hidden(self, s, device):
        ones = torch.ones(s, s, dtype=torch.bool, device=device)
        return ~(ones.tril().triu(-11))


class BufferCausal(Scored):
    """nanoGPT's spelling: a tril buffer sliced to the length, compared with 0."""

    def __init__(self):
        super().__init__()
        self.register_buffer("tril", torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64))

    def hidden(self, s, device):
        return self.tril[:, :, :s, :s] == 0


class BufferBand(BufferCausal):
    """A banded buffer (width 5): its diagonals are checked, not its top-left corner."""

    def __init__(self):
        super().__init__()
        self.tril = torch.ones(64, 64).tril().triu(-4).view(1, 1, 64, 64)


class LearnedBias(Scored):
    """A learned bias: no provable form, kept as a general mask."""

    def __init__(self):
        super().__init__()
        self.rel = nn.Parameter(rand(64, 64))

    def hidden(self, s, device):
        i = torch.arange(s, device=device)
        return i[None, :] > i[:, None]

    def bias(self, q, s):
        return self.rel[:s, :s]


class Alibi(Scored):
    """Causal with ALiBi: slopes[h] * (j - i) added to the scores."""

    def __init__(self):
        super().__init__()
        self.register_buffer("slopes", torch.tensor([0.5, 0.25, 0.125, 0.0625]))

    def hidden(self, s, device):
        i = torch.arange(s, device=device)
        return i[None, :] > i[:, None]

    def bias(self, q, s):
        i = torch.arange(s, device=q.device)
        return self.slopes[:, None, None] * (i[None, :] - i[:, None])[None]  # (h, s, s)


SLOPES = (0.5, 0.25, 0.125, 0.0625)


class BatchedAlibi(nn.Module):
    """ALiBi the way Falcon and Bloom spell it: slopes (h, 1, 1) * key position, tiled over the batch with
    repeat to (b*h, 1, s), then either added to 4-d scores before an in-place scale (Falcon: `(s + bias) *= c`)
    or used as the baddbmm input of 3-d (b*h, s, d) attention (Bloom)."""

    def __init__(self, bloom: bool):
        super().__init__()
        self.bloom = bloom
        self.qkv = nn.Linear(32, 96)
        self.o = nn.Linear(32, 32)
        self.register_buffer("slopes", torch.tensor(SLOPES))

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, 4, 8).permute(2, 0, 3, 1, 4)  # (b, h, s, d) each
        alibi = (self.slopes[:, None, None] * torch.arange(s, device=x.device)).repeat(b, 1, 1)  # (b*h, 1, s)
        i = torch.arange(s, device=x.device)
        causal = torch.where(i[None, :] > i[:, None], torch.finfo(x.dtype).min, 0.0)  # (s, s)
        if self.bloom:
            scores = alibi.baddbmm(q.reshape(b * 4, s, 8), k.reshape(b * 4, s, 8).transpose(-1, -2),
                                   beta=1.0, alpha=8**-0.5).view(b, 4, s, s)
            probs = torch.softmax(scores + causal, dim=-1).view(b * 4, s, s)
            out = torch.bmm(probs, v.reshape(b * 4, s, 8)).view(b, 4, s, 8)
        else:
            scores = q @ k.transpose(-1, -2) + alibi.view(b, 4, 1, s)
            scores *= 8**-0.5
            out = torch.softmax(scores + causal, dim=-1) @ v
        return self.o(out.transpose(1, 2).reshape(b, s, 32))


def analysed(model, seq=8):
    kwargs, dims = {"x": rand(2, seq, 32)}, {"x": {0: "batch", 1: "seq"}}
    captured = capture(model, kwargs, dims)
    (site,) = attention.find_sites(captured.gm)
    return captured, site, attention._classify(site.plan, None, {})


def reference_hidden(kind: str, s: int, width: int = 0) -> torch.Tensor:
    i = torch.arange(s)
    d = i[None, :] - i[:, None]  # key minus query
    if kind == "causal":
        return d > 0
    return (d > 0) | (d <= -width)


@pytest.mark.parametrize("module", [ArangeWindow, TriuWindow])
def test_a_window_wider_than_the_capture_is_proved_a_window(module):
    _, _, form = analysed(module().eval(), seq=8)  # at s = 8 a width-12 band hides exactly what causal hides
    assert (form.kind, form.causal, form.window) == ("window", True, 12), form
    s = 30  # the form's definition against the model's own mask at a length past the width
    expected = reference_hidden("window", s, form.window)
    assert torch.equal(module().hidden(s, "cpu"), expected)


def test_buffers_are_read_along_every_diagonal():
    _, _, causal = analysed(BufferCausal().eval())
    _, _, band = analysed(BufferBand().eval())
    assert (causal.kind, causal.window) == ("causal", 0)
    assert (band.kind, band.window) == ("window", 5)
    assert torch.equal(BufferBand().hidden(40, "cpu")[0, 0], reference_hidden("window", 40, 5))


def test_learned_bias_stays_general_with_a_reason():
    _, _, form = analysed(LearnedBias().eval())
    assert form.kind == "general" and "parameter" in form.reason


def test_alibi_slopes_are_read_from_the_bias():
    _, _, form = analysed(Alibi().eval())
    assert form.kind == "causal" and form.alibi_slopes == pytest.approx((0.5, 0.25, 0.125, 0.0625))


@pytest.mark.parametrize("bloom", [False, True], ids=["falcon-style", "bloom-style"])
def test_tiled_alibi_under_a_scale_is_read_and_rewritten(bloom):
    model = BatchedAlibi(bloom).eval()
    fast = fxopt.optimize(model, {"x": rand(2, 8, 32)}, dynamic_dims={"x": {0: "batch", 1: "seq"}})
    (node,) = [n for n in fast.gm.graph.nodes if n.target == ATTN]
    info = node.meta[attention.ATTENTION_KEY]
    assert (info.mask_kind, info.alibi) == ("causal", True), info
    slopes = getattr(fast.gm, node.kwargs["alibi_slopes"].target)
    # Falcon scales the biased scores, so its bias is scaled too; Bloom's baddbmm scales q @ kᵀ only
    torch.testing.assert_close(slopes, torch.tensor(SLOPES) * (1.0 if bloom else 8**-0.5))
    for s in (8, 20, 40):
        x = rand(2, s, 32, seed=s)
        with torch.no_grad():
            torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("module", [ArangeWindow, BufferBand, Alibi, LearnedBias])
def test_optimized_matches_eager_past_the_window(module):
    model = module().eval()
    fast = fxopt.optimize(model, {"x": rand(2, 8, 32)}, dynamic_dims={"x": {0: "batch", 1: "seq"}})
    (node,) = [n for n in fast.gm.graph.nodes if n.target == ATTN]
    info = node.meta[attention.ATTENTION_KEY]
    assert info.window == {ArangeWindow: 12, BufferBand: 5}.get(module, 0)
    assert info.alibi == (module is Alibi)
    for s in (8, 20, 40):
        x = rand(2, s, 32, seed=s)
        with torch.no_grad():
            torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)


def test_padding_and_window_from_an_attention_mask_input():
    class Padded(ArangeWindow):
        def forward(self, x, attention_mask):
            self._pad = attention_mask
            return super().forward(x)

        def hidden(self, s, device):
            return super().hidden(s, device) | (self._pad[:, None, None, :] == 0)

    model = Padded().eval()
    mask = torch.ones(2, 8, dtype=torch.long)
    kwargs = {"x": rand(2, 8, 32), "attention_mask": mask}
    captured = capture(model, kwargs, {"x": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}})
    (site,) = attention.find_sites(captured.gm)
    form = attention._classify(site.plan, None, {})
    assert form.kind == "window+padding" and form.window == 12
    assert form.padding_source is not None and form.padding_source.target == "attention_mask"


def mistral(window=16):
    transformers = pytest.importorskip("transformers")
    config = transformers.AutoConfig.for_model(
        "mistral", num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, sliding_window=window, max_position_embeddings=128)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


@pytest.fixture
def planted_fault(monkeypatch):
    """The old defect on purpose: a proved window recorded as plain causal."""
    decide = masks._decide

    def causal_instead(*args, **kwargs):
        form = decide(*args, **kwargs)
        return dataclasses.replace(form, kind="causal", window=0) if form.kind == "window" else form

    monkeypatch.setattr(masks, "_decide", causal_instead)


def test_verify_passes_on_mistral_and_says_what_it_compared():
    model = mistral()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    fast = fxopt.optimize(model, {"input_ids": ids}, verify=True)
    assert "16 and 32" in fast.verification  # the longer length passes window + 8
    gen = fxopt.optimize(model, {"input_ids": ids}, kv_cache=True, max_seq_len=64, verify=True)
    assert "decode to 32" in gen.verification


@pytest.mark.parametrize("kv_cache", [False, True])
def test_verify_catches_a_window_treated_as_causal(planted_fault, kv_cache):
    model = mistral()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with pytest.raises(numerics.VerificationError):
        fxopt.optimize(model, {"input_ids": ids}, verify=True, kv_cache=kv_cache, max_seq_len=64)


def test_verify_excludes_padded_query_rows():
    transformers = pytest.importorskip("transformers")
    config = transformers.AutoConfig.for_model(
        "llama", num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    ids = torch.randint(0, 256, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, :3] = 0  # left padding: rows 0..2 of sequence 0 see no key
    fast = fxopt.optimize(model, {"input_ids": ids, "attention_mask": mask}, verify=True)
    assert "matched eager" in fast.verification


def test_unknown_options_name_the_accepted_ones():
    with pytest.raises(TypeError, match="unknown option fusee.*accepted: hw, fuse"):
        fxopt.optimize(ArangeWindow().eval(), {"x": rand(2, 8, 32)}, fusee=False)


def test_max_batch_defaults_to_the_example_batch():
    model = mistral()
    gen = fxopt.optimize(model, {"input_ids": torch.randint(0, 256, (3, 8))}, kv_cache=True, max_seq_len=32)
    assert gen.max_batch == 3


def test_windowed_attention_costs_only_the_band():
    """FLOPs against the band's area (the cost model's continuous pair count, as causal is s²/2: row i sees
    min(i, w) keys, integrated over i in [0, s]), itself within the diagonal (s/2) of the pairs counted from
    the model's own mask; K/V bytes against the keys some query sees (here every key)."""
    from fxopt.capture import role_symbol
    from fxopt.passes import cost
    from fxopt.pipeline import make_context

    model = ArangeWindow().eval()
    captured = capture(model, {"x": rand(2, 8, 32)}, {"x": {0: "batch", 1: "seq"}})
    ctx = make_context(captured, "h100", None)
    attention.run(captured.gm, ctx)
    (node,) = [n for n in captured.gm.graph.nodes if n.target == ATTN]
    assert node.kwargs.get("window") == 12
    got = cost.fxopt_attention_cost(ctx, node)
    b, s = role_symbol("batch"), role_symbol("seq")
    w = 12
    for length in (8, 12, 30):
        area = length**2 / 2 if length <= w else w**2 / 2 + w * (length - w)
        assert float(got.flops.xreplace({b: 2, s: length})) == 4 * 2 * 4 * 8 * area, length
        visible = int((~model.hidden(length, "cpu")).sum())
        assert 0 < visible - area <= length / 2
    qkv_o = 4 * 2 * 4 * 30 * 8 * 4  # q, k, v, o at s = 30, fp32: a window never hides a key from every query
    assert got.bytes.xreplace({b: 2, s: 30}) == qkv_o
