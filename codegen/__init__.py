"""Triton code generation: fused-region emitters and hand-written kernel templates (installed as fxopt.codegen)."""
