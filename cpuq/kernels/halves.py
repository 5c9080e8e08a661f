"""Bit-level float conversions for Numba kernels: IEEE half-precision (fp16) <-> float32,
and float32 from its bits. Numba has no float16 type: fp16 values live in uint16 arrays, and these intrinsics are LLVM's fpext /
fptrunc on them (one vcvtph2ps / vcvtps2ph with F16C, native on ARM; loops over them
vectorize). Rounding to fp16 is to nearest, ties to even, as numpy's astype(np.float16)
and ggml's fp32 -> fp16. `as_f32` / `stored` let one kernel serve arrays of either
storage, uint16 fp16 bits or float32 (Numba compiles one version per array type).

Imports numba and llvmlite only.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic


def _fpext(context, builder, signature, args):
    return builder.fpext(builder.bitcast(args[-1], ir.HalfType()), ir.FloatType())


def _fptrunc(context, builder, signature, args):
    return builder.bitcast(builder.fptrunc(args[-1], ir.HalfType()), ir.IntType(16))


def _same(context, builder, signature, args):
    return args[-1]


@intrinsic
def f16_to_f32(typingctx, bits):
    """f16_to_f32(uint16 bits of an fp16) -> float32, exactly."""
    if bits != types.uint16:
        return None
    return types.float32(bits), _fpext


@intrinsic
def f32_to_f16(typingctx, value):
    """f32_to_f16(float32) -> uint16 bits of the nearest fp16 (ties to even; beyond the
    fp16 range: inf)."""
    if value != types.float32:
        return None
    return types.uint16(value), _fptrunc


@intrinsic
def as_f32(typingctx, value):
    """An element of a uint16 (fp16 bits) or float32 array as float32, exactly."""
    if value == types.uint16:
        return types.float32(value), _fpext
    if value == types.float32:
        return types.float32(value), _same
    return None


@intrinsic
def stored(typingctx, array, value):
    """float32 `value` as an element of `array`: fp16 bits (nearest, ties to even) for a
    uint16 array, unchanged for a float32 one."""
    if value != types.float32 or not isinstance(array, types.Array):
        return None
    if array.dtype == types.uint16:
        return types.uint16(array, value), _fptrunc
    if array.dtype == types.float32:
        return types.float32(array, value), _same
    return None


@intrinsic
def f32_from_bits(typingctx, bits):
    """The float32 whose IEEE bits are the low 32 bits of the integer `bits` (a bitcast;
    Numba widens int32 arithmetic to int64)."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        v = args[0]
        if v.type.width > 32:
            v = builder.trunc(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())

    return types.float32(bits), codegen
