"""The attention kernels' GPU path (prefill and decode split kernels) compiles for sm_90 ahead of time.

The CPU tests run the kernels in Triton's interpreter, which never lowers them; this compiles the real
thing to PTX (tests/aot_sm90.py)."""

from aot_sm90 import run_script

_AOT_SCRIPT = r"""
from fxopt.codegen import flash_attention as fa, flash_decoding as fd

assert not fa._INTERPRET

POINTERS = {"Q": None, "K": None, "V": None, "O": None, "PAD": "*u8", "KV_LEN": "*i32", "Q_OFF": "*i64",
            "KV_START": "*i32", "MID": "*fp32", "COUNTS": "*i32"}


def signature(jit, ptr_type, descriptors=None):
    def kind(p):
        if p.is_constexpr:
            return "constexpr"
        if p.name in POINTERS:
            return POINTERS[p.name] or ptr_type
        if descriptors and p.name in descriptors:
            return descriptors[p.name]
        return "fp32" if p.name == "qk_scale" else "i32"
    return {p.name: kind(p) for p in jit.params}

def compile_variant(jit, constexprs, ptr_type="*bf16", descriptors=None):
    return compile_sm90(jit, signature(jit, ptr_type, descriptors), constexprs, num_warps=8, num_stages=3)

KV_TILE = "tensordesc<bf16[1,1,128,128]>"
for causal in (False, True):
    for pad, tma in ((False, False), (True, False), (False, True), (True, True)):
        c = compile_variant(fa._flash_attn_fwd, dict(HEAD_DIM=128, BLOCK_D=128, CAUSAL=causal, HAS_PAD=pad,
                            HAS_KV_LEN=False, Q_OFF_TENSOR=False, DOT_PREC="tf32", TMA=tma, BLOCK_M=128,
                            BLOCK_N=128), descriptors={"K_DESC": KV_TILE, "V_DESC": KV_TILE} if tma else None)
        ptx = c.asm["ptx"]
        assert "mma" in ptx
        assert ("cp.async.bulk.tensor" in ptx) == tma  # the fast path's K/V tiles by the copy engine
        print("compiled prefill", causal, pad, tma)

# (causal, PDL, prefetched keys, TMA, merge): the default on Hopper (PDL, TMA, no prefetch, the last program
# merges), pointer loads with FXOPT_DECODE_PREFETCH=64, no PDL, the merge kernel's split kernel
DECODE_TILE = "tensordesc<bf16[1,1,128,128]>"
for causal, pdl, prefetch, tma, merge in ((False, True, 0, True, True), (True, True, 0, True, False),
                                          (True, True, 64, False, True), (True, False, 0, False, False)):
    c = compile_variant(fd._decode_split_kernel, dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_M=16, BLOCK_N=128,
                        CAUSAL=causal, Q_OFF_MODE=0, DOT_PREC="tf32", HAS_START=True, PDL=pdl,
                        PREFETCH_N=prefetch, LINES=2, TMA=tma, MERGE=merge, BLOCK_S=16),
                        descriptors={"K_DESC": DECODE_TILE, "V_DESC": DECODE_TILE} if tma else None)
    ptx = c.asm["ptx"]
    assert "ld.global" in ptx or "cp.async" in ptx  # the ragged last tile: pointer loads
    assert ("cp.async.bulk.tensor" in ptx) == tma  # whole tiles by the copy engine
    assert ("griddepcontrol.launch_dependents" in ptx) == pdl  # lets the next kernel launch early
    assert ("prefetch.global.L2" in ptx) == (prefetch > 0)  # the chunk's first keys asked for before the wait
    if prefetch:
        assert ptx.find("prefetch.global.L2") < ptx.find("griddepcontrol.wait")  # before the wait, not after
    # the last program merges: a GPU-scope acquire-release count after a barrier, the partials read from L2
    assert ("atom.global.gpu.acq_rel.add" in ptx) == merge and ("ld.global.cg" in ptx) == merge
    if merge:
        assert ptx.rfind("bar.sync", 0, ptx.find("atom.global.gpu.acq_rel.add")) > 0
    print("compiled decode", causal, pdl)

for pdl in (False, True):
    c = compile_variant(fd._decode_merge_kernel, dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_S=64, SLICE=32,
                        WAIT_PRIMARY=pdl))
    ptx = c.asm["ptx"]
    assert ("griddepcontrol.wait" in ptx) == pdl
    # the next kernel may launch only once the split kernel has finished (no launch cascade)
    if pdl:
        assert ptx.find("griddepcontrol.wait") < ptx.find("griddepcontrol.launch_dependents")
    print("compiled merge", pdl)
"""


def test_attention_kernels_compile_for_sm90_without_a_gpu(tmp_path):
    out = run_script(tmp_path, "aot_attention", _AOT_SCRIPT)
    assert out.count("compiled prefill") == 8
    assert out.count("compiled decode") == 4
    assert out.count("compiled merge") == 2
