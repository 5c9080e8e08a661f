"""Bit-level float conversions for Numba kernels: IEEE half-precision (fp16) <-> float32,
and float32 from its bits. Numba has no float16 type: fp16 values live in uint16 arrays, and these intrinsics are LLVM's fpext /
fptrunc on them (one vcvtph2ps / vcvtps2ph with F16C, native on ARM; loops over them
vectorize). Rounding to fp16 is to nearest, ties to even, as numpy's astype(np.float16)
and ggml's fp32 -> fp16. `as_f32` / `stored` let one kernel serve arrays of either
storage, uint16 fp16 bits or float32 (Numba compiles one version per array type).

Imports numba, llvmlite and kernels.blocks' IR helpers.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .blocks import _loop, _splat


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


# ---------------------------------------------------------------------------------------------
# The two products of decode attention over a block of BLOCK_POSITIONS cached positions, as
# vector IR with the accumulators in registers (Numba's loops keep them in memory, re-loaded
# and stored per head dimension / per position). Arrays hold fp16 bits (uint16) or float32.

BLOCK_POSITIONS = 64


def _vec_loader(b, dtype, n: int):
    """ptr (to uint16 or float32 elements), element offset -> <n x float>."""
    def load(ptr, offset):
        if dtype == types.uint16:
            vt = ir.VectorType(ir.IntType(16), n)
            v = b.load(b.bitcast(b.gep(ptr, [offset]), vt.as_pointer()), align=2)
            return b.fpext(b.bitcast(v, ir.VectorType(ir.HalfType(), n)), ir.VectorType(ir.FloatType(), n))
        vt = ir.VectorType(ir.FloatType(), n)
        return b.load(b.bitcast(b.gep(ptr, [offset]), vt.as_pointer()), align=4)
    return load


def _fma(b, a, x, y):
    t = b.fmul(x, y)
    s = b.fadd(a, t)
    t.flags.append("contract")
    s.flags.extend(("contract", "reassoc"))
    return s


def _data(context, builder, aryty, ary):
    return context.make_array(aryty)(context, builder, ary).data


@intrinsic
def block_scores(typingctx, q, kb, out):
    """block_scores(q, kb, out): out[j] += sum_d q[d] * kb[d, j] for all j < 64, with q:
    (hd,) f32, kb: (hd, 64) keys (uint16 fp16 bits or float32, C-contiguous), out: >= 64
    f32. The caller guarantees those shapes."""
    if not (isinstance(kb, types.Array) and kb.dtype in (types.uint16, types.float32) and kb.layout == "C"
            and kb.ndim == 2):
        return None
    sig = types.void(q, kb, out)

    def codegen(context, builder, signature, args):
        b = builder
        qp, kp, op = (_data(context, b, t, a) for t, a in zip(signature.args, args))
        hd = context.make_array(signature.args[1])(context, b, args[1]).shape
        hd = b.extract_value(hd, 0)
        v16 = ir.VectorType(ir.FloatType(), 16)
        load = _vec_loader(b, kb.dtype, 16)
        zero = ir.Constant(v16, None)

        def body(d, accs):
            qd = _splat(b, b.load(b.gep(qp, [d])), 16)
            row = b.mul(d, ir.Constant(ir.IntType(64), BLOCK_POSITIONS))
            return [_fma(b, a, qd, load(kp, b.add(row, ir.Constant(ir.IntType(64), 16 * c))))
                    for c, a in enumerate(accs)]

        accs = _loop(b, hd, body, [zero] * 4)
        for c, a in enumerate(accs):
            ptr = b.bitcast(b.gep(op, [ir.Constant(ir.IntType(64), 16 * c)]), v16.as_pointer())
            b.store(b.fadd(b.load(ptr, align=4), a), ptr, align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def block_values(typingctx, p, vb, cnt, acc):
    """block_values(p, vb, cnt, acc): acc[d] += sum_{j < cnt} p[j] * vb[j, d] for all d,
    with p: >= cnt f32, vb: (>= cnt, hd) values (uint16 fp16 bits or float32,
    C-contiguous), acc: (hd,) f32, hd a multiple of 16. The caller guarantees those."""
    if not (isinstance(vb, types.Array) and vb.dtype in (types.uint16, types.float32) and vb.layout == "C"
            and vb.ndim == 2):
        return None
    sig = types.void(p, vb, types.intp, acc)

    def codegen(context, builder, signature, args):
        b = builder
        i64 = ir.IntType(64)
        pp, vp = _data(context, b, signature.args[0], args[0]), _data(context, b, signature.args[1], args[1])
        ap = _data(context, b, signature.args[3], args[3])
        hd = b.extract_value(context.make_array(signature.args[1])(context, b, args[1]).shape, 1)
        cnt = args[2]
        v16 = ir.VectorType(ir.FloatType(), 16)
        load = _vec_loader(b, vb.dtype, 16)
        # Chunks of 64 head dimensions (4 accumulators), then of 16 for the rest.
        wide = b.sdiv(hd, ir.Constant(i64, 64))
        rest = b.sdiv(b.srem(hd, ir.Constant(i64, 64)), ir.Constant(i64, 16))

        def chunk_pass(base, width):
            ptrs = [b.bitcast(b.gep(ap, [b.add(base, ir.Constant(i64, 16 * c))]), v16.as_pointer())
                    for c in range(width)]
            start = [b.load(x, align=4) for x in ptrs]

            def body(j, accs):
                pj = _splat(b, b.load(b.gep(pp, [j])), 16)
                row = b.add(b.mul(j, hd), base)
                return [_fma(b, a, pj, load(vp, b.add(row, ir.Constant(i64, 16 * c)))) for c, a in enumerate(accs)]

            for x, a in zip(ptrs, _loop(b, cnt, body, start)):
                b.store(a, x, align=4)

        def wide_body(c, state):
            chunk_pass(b.mul(c, ir.Constant(i64, 64)), 4)
            return state

        _loop(b, wide, wide_body, [])

        def rest_body(c, state):
            chunk_pass(b.add(b.mul(wide, ir.Constant(i64, 64)), b.mul(c, ir.Constant(i64, 16))), 1)
            return state

        _loop(b, rest, rest_body, [])
        return context.get_dummy_value()

    return sig, codegen
