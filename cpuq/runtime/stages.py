"""A model file's stage functions bound to one path's ops: the same code, so the decode
step, the prompt chunk and the GPU compute what the model file says, each with its own
kernels.

bind() gives each stage a copy of its module's globals in which the op names (rms_norm,
linear3, attend, ...) are that path's functions; with jit, the copies are Numba functions
(cached on disk under their own names, so the paths' compiled code never mixes).

Imports cpuq.errors; cpuq.kernels.step and numba for the decode step, runtime.chunk for
the prompt chunk (when first asked for).
"""
from __future__ import annotations

import builtins
import dis
from functools import lru_cache
from types import FunctionType, ModuleType, SimpleNamespace

from ..errors import UnsupportedError


def bind(module: ModuleType, ops: dict, path: str, jit=None) -> SimpleNamespace:
    """module's STAGES with `ops` for their op names (UnsupportedError if one is missing).
    path names the copies (block -> block_step); jit: a decorator applied to each
    (numba.njit, or one chosen per function)."""
    scope = dict(vars(module))
    scope.update(ops)
    out = {}
    for f in module.STAGES:
        names = {i.argval for i in dis.get_instructions(f) if i.opname == "LOAD_GLOBAL"}
        missing = sorted(name for name in names if name not in scope and not hasattr(builtins, name))
        if missing:
            raise UnsupportedError(f"{module.__name__}.{f.__name__} needs {', '.join(missing)}, which the {path} "
                                   f"path lacks")
        g = FunctionType(f.__code__, scope, f.__name__, f.__defaults__, f.__closure__)
        g.__qualname__ = f"{f.__qualname__}_{path}"
        g.__doc__ = f.__doc__
        out[f.__name__] = scope[f.__name__] = jit(g) if jit else g
    return SimpleNamespace(**out, scope=scope)


def _layer_at_source(module: ModuleType) -> str:
    """def layer_at(p, il): module.Layer of block il of a kernels.step.StepPack."""
    args, matrix, vector = [], 0, 0
    for t in module.TENSORS:
        if t.is_matrix:
            args.append(f"(matrix_at(p.buf, p.at[il, {matrix}]), p.types[il, {matrix}])")
            matrix += 1
        else:
            args.append(f"p.vectors[{vector}][il]")
            vector += 1
    return "def layer_at(p, il):\n    return Layer(" + ", ".join(args) + ")\n"


@lru_cache(maxsize=None)
def decode_step(module: ModuleType) -> SimpleNamespace:
    """The model's stages over kernels.step's ops, as Numba functions, and `blocks`: one
    token through the first n blocks of a StepPack in one call."""
    from numba import njit

    from ..kernels import step
    # block inlines into blocks: one compiled unit less at a cold start
    ns = bind(module, step.OPS, "step",
              lambda f: njit(inline="always")(f) if f.__name__ == "block" else njit(cache=True)(f))
    scope = {"Layer": module.Layer, "matrix_at": step.matrix_at}
    exec(_layer_at_source(module), scope)  # compiled into `blocks`, never called alone: nothing to cache
    blocks = FunctionType(step.blocks.__code__, {**vars(step), "block": ns.block,
                                                 "layer_at": njit(inline="always")(scope["layer_at"])},
                          "blocks", None, None)
    blocks.__qualname__ = f"blocks_{module.__name__.rsplit('.', 1)[-1]}"
    ns.blocks = njit(cache=True)(blocks)
    return ns


@lru_cache(maxsize=None)
def prompt_chunk(module: ModuleType) -> SimpleNamespace:
    """The model's stages over runtime.chunk's ops (Python, threaded kernels)."""
    from . import chunk
    return bind(module, chunk.OPS, "chunk")
