"""Op names with a meaning of their own across fxopt (no torch import: the report renderer uses them too)."""

#: Graph bookkeeping that computes nothing: size reads, tuple unpacking, export's guard call, runtime asserts
#: (op names without the aten namespace; export's guard module as the report spells a call_module).
BOOKKEEPING = frozenset({"getitem", "sym_size.int", "sym_numel", "sym_stride.int", "sym_storage_offset",
                         "_guards_fn", "call_module:_guards_fn", "_assert_scalar", "_assert_tensor_metadata",
                         "_assert_async.msg", "sym_constrain_range_for_size"})

#: Ops a value passes through unchanged in position and meaning (ATen 'packet.overload' names; passes resolve them
#: with fxopt.nodes.aten_ops, or aten_packets for every overload of each): the attention pass walks through them
#: between q·kᵀ, softmax and P·V, kv_cache's token-axis analysis treats their packets as elementwise.
CASTS = frozenset({"to.dtype", "to.dtype_layout", "_to_copy.default", "type_as.default"})  # dtype conversions
IDENTITY = frozenset({"clone.default", "contiguous.default", "alias.default", "detach.default"})  # copies, aliases
DROPOUT = frozenset({"dropout.default"})  # the identity in eval mode (train=False)
#: Reshapes that keep the elements in order: attention matches same-shape ones and repeat_kv's merge of the heads,
#: kv_cache un-repeats K/V through the same three.
RESHAPES = frozenset({"reshape.default", "view.default", "_unsafe_view.default"})
