"""Graph analyses and rewrites, one module per pass family (installed as fxopt.passes)."""
