"""Op names with a meaning of their own across fxopt (no torch import: the report renderer uses them too)."""

#: Graph bookkeeping that computes nothing: size reads, tuple unpacking, export's guard call, runtime asserts
#: (op names without the aten namespace; export's guard module as the report spells a call_module).
BOOKKEEPING = frozenset({"getitem", "sym_size.int", "sym_numel", "sym_stride.int", "sym_storage_offset",
                         "_guards_fn", "call_module:_guards_fn", "_assert_scalar", "_assert_tensor_metadata",
                         "_assert_async.msg", "sym_constrain_range_for_size"})
