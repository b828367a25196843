"""The tools that measure fxopt against its peers on a GPU (none of the compiler imports them):

    forward.py         `fxopt bench MODEL`: eager vs fxopt vs torch.compile, whole forward and per region
    decode.py          `fxopt bench MODEL --decode`: generation against HF generate and static cache + compile
    fused.py           `fxopt bench --suite fused`: generated fused chains against eager, compile and copy speed
    attention.py       `fxopt bench --suite attention`: FlashAttention / Flash-Decoding against SDPA backends
    profile_decode.py  what one decode step launches, kernel by kernel
"""
