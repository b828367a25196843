"""fxopt: a readable torch.fx compiler for transformer inference."""

__version__ = "0.1.0"
