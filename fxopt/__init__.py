"""fxopt: a readable torch.fx compiler for transformer inference.

    fxopt.optimize(model, example_inputs, ...)   faster module (or, with kv_cache=True, a generator)
    fxopt.analyze(model_or_preset, ...)          per-node FLOPs, bytes, intensity and roofline bound
    fxopt.bench.forward.bench_model(preset, ...) eager vs fxopt vs torch.compile
"""

__version__ = "0.1.0"

from fxopt.analyze import analyze  # noqa: E402
from fxopt.optimize import optimize  # noqa: E402

__all__ = ["analyze", "optimize", "__version__"]
