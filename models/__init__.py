"""Reference transformer family (installed as fxopt.models)."""
