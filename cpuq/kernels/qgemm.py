"""Products of a prompt chunk with quantized weight matrices in 8-bit integers (x86 with
AVX512-VNNI): each token's activations are rounded to two int8 digits per 32 elements, the
weights are unpacked 16 rows at a time into unsigned bytes, and vpdpbusd multiplies 64 byte
pairs per instruction, once per digit.

Why: on this kind of core a 512-bit vpdpbusd issues about once per cycle (64 multiply-adds),
where float32 FMAs give 16 per cycle: the sgemm route (decode a tile to float32, then BLAS)
is bound by the float multiply-adds, this one by the scales and, for short chunks, the
unpacking (~20% of a 32-token chunk's time, the whole matrix being unpacked whatever the
tokens). Why two digits: one (llama.cpp's Q8 rounding, to 2^-8 of each 32 values' largest
|x|) is twice as fast but loses the small values that share a group with an outlier
channel (real models have activations of ~450 beside ~1); it turned the demo model's
"Paris" into nonsense, as it does in llama.cpp.

Every block type is read as w[r, i] = a[r, g] * u[r, i] - b[r, g] for i in group g (16 or
32 elements) with u an unsigned byte: Q4_K a = d*scale, b = dmin*min; Q6_K a = d*scale,
b = 32*a; Q8_0 u = q + 128, b = 128*d; Q5_0 b = 16*d; Q4_0 b = 8*d; Q4_1/Q5_1 b = -m.
With x[t, i] = d8[t, i/32] * (256 hi[t, i] + lo[t, i]) (quantize_tokens): out[t, r] =
sum_g a[r, g] d8[t, g] (256 S_hi + S_lo)[t, r, g] - b[r, g] xs[t, g], S the exact int32 sums
of u times each digit over the group, xs the group's sum of the rounded x. So the only
rounding beyond float32 sums is x's, to 2^-16 / 127 of each 32 elements' largest |x| (the
precision of the int16 decode path, kernels/matvec.py).

Layouts: a strip of 16 rows unpacked as u: (k/4, 16, 4) bytes (four consecutive elements of
one row are one int32 lane, the 16 rows the 16 lanes), a and b: (k/G, 16) float32; tokens
go 8 at a time (x8 rows padded to a multiple of 8 with zeros).

Bounds: the IR reads k bytes of each of n8*8 token rows, k/32 scales and k/G sums of each,
16k bytes of u and k/G*16 floats of a and b, and writes n8*8*16 floats; `qgemm_rows`
checks every array holds that before calling it. The unpackers read the blocks that both
the row and k hold (zeros beyond), so no bytes, however malformed, reach outside.

Imports numpy, numba, llvmlite, cpuq.quants.types and the sibling kernels.blocks / matmul only.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from ..quants.types import GGML_TYPES, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0
from .blocks import (F32, I8, I32, I64, V16B, V16F, V16I, V32B, _FAST, _by_type, _concat, _function, _half,
                     _intrinsic_fn, _k_ints, _k_scales_mins, _load, _loop, _q4_ints, _q5_ints, _q6_k_groups,
                     _row_pointer, _splat, _vconst, host_cpu_features)
from .matmul import BLOCK_ELEMS, n_blocks

ROWS = 16  # weight rows per strip: the 16 int32 lanes of a 512-bit register
TOKENS = 8  # tokens per pass over a strip: 8 int32 + 8 float accumulators stay in registers


_FEATURES = host_cpu_features()
HOST_VNNI = bool(_FEATURES.get("avx512vnni") and _FEATURES.get("avx512bw") and _FEATURES.get("avx512f"))


# ---------------------------------------------------------------------------------------------
# Activations -> int8.

@njit(cache=True, nogil=True)
def quantize_tokens(x, x8, x8r, d8, xs16, xs32):
    """x: (n, k) f32, k a multiple of 32 -> two int8 digits per element, x[t, i] ~
    d8[t, i/32] * (256 * x8[t, i] + x8r[t, i]): x8 (-127..127) rounds x to steps of 1/127 of
    the 32 elements' largest |x| and x8r (-128..127) rounds what is left to 1/256 of a step:
    an error of half that at most, 2^-16 / 127 of the largest |x|.
    xs16 / xs32: the sums of those values over each 16 / 32 elements. A group holding
    NaN/inf gets d8 = NaN (its products are NaN, as in float)."""
    n = min(x.shape[0], x8.shape[0], x8r.shape[0], d8.shape[0], xs16.shape[0], xs32.shape[0])
    groups = min(x.shape[1] // 32, x8.shape[1] // 32, x8r.shape[1] // 32, d8.shape[1], xs16.shape[1] // 2,
                 xs32.shape[1])
    for t in range(n):
        for g in range(groups):
            amax = np.float32(0.0)
            finite = True
            for j in range(32):
                v = x[t, 32 * g + j]
                amax = max(amax, abs(v))
                finite &= np.isfinite(v)  # max() would pass over a NaN
            step = amax / np.float32(127.0) if finite else np.float32(np.nan)
            d = step / np.float32(256.0)
            d8[t, g] = d
            inv = np.float32(1.0) / step if step > 0.0 else np.float32(0.0)
            for h in range(2):
                s = 0
                for j in range(16 * h, 16 * h + 16):
                    v = x[t, 32 * g + j] * inv if step > 0.0 else np.float32(0.0)
                    hi = np.int32(min(np.float32(127.0), max(np.float32(-127.0), np.rint(v))))
                    lo = np.int32(np.rint((v - np.float32(hi)) * np.float32(256.0)))  # -128 .. 128
                    if lo > 127:  # v - hi = 1/2 exactly: carry (then hi < 127, as v <= 127)
                        hi += 1
                        lo -= 256
                    x8[t, 32 * g + j] = hi
                    x8r[t, 32 * g + j] = lo
                    s += 256 * hi + lo
                xs16[t, 2 * g + h] = np.float32(s) * d
            xs32[t, g] = xs16[t, 2 * g] + xs16[t, 2 * g + 1]


@njit(cache=True, inline="always")
def group_size(ggml_type):
    """Elements per (a, b) pair of a type in TYPES: Q6_K scales 16, the others 32."""
    return 16 if ggml_type == Q6_K else 32


# ---------------------------------------------------------------------------------------------
# Weight rows -> unsigned bytes in the strip layout, and per-group a, b.
#
# In LLVM vector IR (blocks.py's helpers): each of 16 rows' block is unpacked in element
# order, 32 values to a <32 x i8> unit and its group factors to a vector, as the decode
# kernels do; the 16 rows' units, as <8 x i32> words, are then transposed to words across
# rows (three rounds of two-register shuffles) and stored whole. Element-by-element Numba
# loops doing the same scattered 4-byte stores ran at 0.9-2.9 G values/s: at 32 tokens
# most of a prompt chunk's product time, since a chunk unpacks whole matrices.

def _unpack_q8_0(b, w):  # u = q + 128 (q's sign bit flipped); a = d, b = 128 d
    d = _half(b, w, 0)
    return [b.xor(_load(b, w, 2, V32B), _vconst(V32B, 0x80))], d, b.fmul(d, ir.Constant(F32, 128.0))


def _unpack_q4_0(b, w):  # u = the nibble; a = d, b = 8 d
    d = _half(b, w, 0)
    return [_q4_ints(b, w, 2)], d, b.fmul(d, ir.Constant(F32, 8.0))


def _unpack_q4_1(b, w):  # a = d, b = -m
    return [_q4_ints(b, w, 4)], _half(b, w, 0), b.fneg(_half(b, w, 2))


def _unpack_q5_0(b, w):  # a = d, b = 16 d
    d = _half(b, w, 0)
    return [_q5_ints(b, w, 2, 6)], d, b.fmul(d, ir.Constant(F32, 16.0))


def _unpack_q5_1(b, w):  # a = d, b = -m
    return [_q5_ints(b, w, 4, 8)], _half(b, w, 0), b.fneg(_half(b, w, 2))


def _k_factors(b, w):
    """Q4_K/Q5_K: a = d * scale, b = dmin * min for the 8 sub-blocks, two <8 x float>."""
    v8f = ir.VectorType(F32, 8)
    scale, minimum = _k_scales_mins(b, w)
    return (b.fmul(_splat(b, _half(b, w, 0), 8), b.uitofp(scale, v8f)),
            b.fmul(_splat(b, _half(b, w, 2), 8), b.uitofp(minimum, v8f)))


def _unpack_q4_k(b, w):
    return (_k_ints(b, w, 16), *_k_factors(b, w))


def _unpack_q5_k(b, w):
    return (_k_ints(b, w, 48, qh_at=16), *_k_factors(b, w))


def _unpack_q6_k(b, w):  # u = q (0..63); a = d * scale per 16 elements, b = 32 a
    a = b.fmul(_splat(b, _half(b, w, 208), 16), b.sitofp(_load(b, w, 192, V16B), V16F))
    return [q for _, q in _q6_k_groups(b, w, offset=0)], a, b.fmul(a, _vconst(V16F, 32.0))


# ggml type id -> unpacker; elements and bytes per block come from types.GGML_TYPES. The
# key order is the order unpack_strip tests a type against TYPES (the common ones first).
UNPACK_IR = {Q4_K: _unpack_q4_k, Q6_K: _unpack_q6_k, Q8_0: _unpack_q8_0, Q5_0: _unpack_q5_0, Q4_0: _unpack_q4_0,
             Q4_1: _unpack_q4_1, Q5_1: _unpack_q5_1, Q5_K: _unpack_q5_k}
TYPES = tuple(UNPACK_IR)  # the types qgemm_rows reads


def _transpose16(b: ir.IRBuilder, rows: list) -> list:
    """16 vectors of n lanes (n = 8 or 16; row r's lane j) -> n vectors of 16 lanes (vector
    j's lane r). Rows r and r + 8 share a register when n = 8; then each round swaps one
    bit of the vector index with the same bit of the lane index (one shuffle per vector)."""
    n = rows[0].type.count
    v = [_concat(b, rows[i], rows[i + 8]) for i in range(8)] if n == 8 else list(rows)
    for t in range(n.bit_length() - 1):
        bit = 1 << t
        new = list(v)
        for i in (i for i in range(n) if not i & bit):
            for c in (0, 1):
                mask = [((lane >> t) & 1) * 16 + ((lane & ~bit) | (c << t)) for lane in range(16)]
                new[i | c * bit] = b.shuffle_vector(v[i], v[i | bit], ir.Constant(ir.VectorType(I32, 16), mask))
        v = new
    return v


def _build_unpack_fn(module: ir.Module, name: str, ggml_type: int) -> ir.Function:
    """void name(i8* w, i64 stride, i64 rows, i64 nb, i8* u, float* a, float* b): the first
    nb blocks of `rows` (1..16) rows `stride` bytes apart from w -> u (element e of row r at
    byte 64 (e/4) + 4r + e%4), a and b (group g of row r at 16g + r); lanes of rows past
    `rows` are zeros (their loads read the last row)."""
    qk, nbytes = GGML_TYPES[ggml_type].block_size, GGML_TYPES[ggml_type].type_size
    groups = qk // group_size.py_func(ggml_type)
    pf = F32.as_pointer()
    fnty = ir.FunctionType(ir.VoidType(), [I8.as_pointer(), I64, I64, I64, I8.as_pointer(), pf, pf])
    fn = ir.Function(module, fnty, name)
    fn.linkage = "internal"
    w, stride, rows, nb, u, a, bb = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    c = lambda v: ir.Constant(I64, v)  # noqa: E731
    last = b.sub(rows, c(1))
    starts = [b.gep(w, [b.mul(b.select(b.icmp_signed("<", c(r), rows), c(r), last), stride)]) for r in range(ROWS)]
    keep = b.icmp_signed("<", ir.Constant(V16I, list(range(ROWS))), _splat(b, b.trunc(rows, I32), 16))

    def store(v, base, index):  # 64 bytes: 16 lanes of i32 or float
        zero = ir.Constant(v.type, None)
        b.store(b.select(keep, v, zero), b.bitcast(b.gep(base, [index]), v.type.as_pointer()), align=4)

    def block(i, _):
        parts = [UNPACK_IR[ggml_type](b, b.gep(start, [b.mul(i, c(nbytes))])) for start in starts]
        for j in range(qk // 32):
            words = _transpose16(b, [b.bitcast(p[0][j], ir.VectorType(I32, 8)) for p in parts])
            for k, v in enumerate(words):
                store(v, u, b.mul(b.add(b.mul(i, c(qk // 4)), c(8 * j + k)), c(64)))
        for f, base in ((1, a), (2, bb)):
            if groups == 1:
                v = ir.Constant(V16F, None)
                for r, p in enumerate(parts):
                    v = b.insert_element(v, p[f], ir.Constant(I32, r))
                vs = [v]
            else:
                vs = _transpose16(b, [p[f] for p in parts])
            for g, v in enumerate(vs):
                store(v, base, b.mul(b.add(b.mul(i, c(groups)), c(g)), c(16)))
        return []

    _loop(b, nb, block, [])
    b.ret_void()
    return fn


@intrinsic
def _unpack_rows(typingctx, ggml_type, w, r0, rows, nb, u, a, b):
    """_unpack_rows(ggml_type, w, r0, rows, nb, u, a, b): _build_unpack_fn's function on rows
    r0 .. r0+rows-1 of w (types in UNPACK_IR; others leave u, a, b alone). The caller
    guarantees 1 <= rows <= 16, r0 + rows <= m, and nb blocks within the rows, u and a, b."""
    arrays = (u, a, b)
    if not (isinstance(ggml_type, types.Integer) and all(isinstance(t, types.Array) and t.layout == "C"
                                                          for t in arrays)):
        return None
    sig = types.void(ggml_type, w, types.intp, types.intp, types.intp, u, a, b)

    def codegen(context, builder, signature, args):
        tv, wv, r0v, rowsv, nbv, *outs = args
        wa = context.make_array(signature.args[1])(context, builder, wv)
        stride = cgutils.unpack_tuple(builder, wa.strides)[0]
        start = _row_pointer(context, builder, signature.args[1], wv, r0v)
        data = [builder.bitcast(context.make_array(t)(context, builder, v).data, p)
                for t, v, p in zip(signature.args[5:], outs, (I8.as_pointer(), F32.as_pointer(), F32.as_pointer()))]

        def emit(t):
            fn = _function(builder.module, f"cpuq_qgemm_unpack_{t}", lambda m, name: _build_unpack_fn(m, name, t))
            builder.call(fn, [start, stride, rowsv, nbv, *data])

        _by_type(builder, tv, emit)
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, nogil=True)
def unpack_strip(w, ggml_type, r0, u, a, b):
    """Rows r0 .. r0+15 of w (uint8 (m, row_bytes) of a type in TYPES) -> u: (k/4 * 64,)
    uint8, a, b: (k/G, 16) f32, all C-contiguous, k = u.shape[0] // 16; rows past m and
    elements past the row's whole blocks are zeros."""
    k = u.shape[0] // 16
    if ggml_type not in TYPES or a.shape[1] != ROWS or b.shape != a.shape or not 0 <= r0 < w.shape[0]:
        u[:] = 0
        a[:] = 0.0
        b[:] = 0.0
        return
    per = a.shape[0] * group_size(ggml_type) // BLOCK_ELEMS[ggml_type]  # blocks the group arrays hold
    nb = min(n_blocks(ggml_type, k, w.shape[1]), per)
    done = nb * BLOCK_ELEMS[ggml_type]  # elements
    u[done * ROWS:] = 0
    a[done // group_size(ggml_type):] = 0.0
    b[done // group_size(ggml_type):] = 0.0
    _unpack_rows(ggml_type, w, r0, min(ROWS, w.shape[0] - r0), nb, u, a, b)


# ---------------------------------------------------------------------------------------------
# The strip kernel.

def _build_strip_fn(module: ir.Module, name: str, group: int) -> ir.Function:
    """void name(i8* u, float* a, float* b, i8* x8, float* d8, float* xs, float* out,
    i64 n8, i64 n_groups, i64 k): for token t < 8*n8 and strip row r (16):
    out[16t + r] = sum over n_groups groups g of `group` elements:
    a[16g + r] * d8[t*(k/32) + g*group/32] * (256 S_hi + S_lo) - b[16g + r] * xs[t*n_groups + g],
    S_hi, S_lo: the int32 sums of u times token t's two digits (x8 row t: k bytes of the
    high digit, then k of the low; |256 S_hi + S_lo| <= 257 * 32 * 255 * 128 < 2^31)."""
    fnty = ir.FunctionType(ir.VoidType(), [I8.as_pointer(), F32.as_pointer(), F32.as_pointer(), I8.as_pointer(),
                                           F32.as_pointer(), F32.as_pointer(), F32.as_pointer(), I64, I64, I64])
    fn = ir.Function(module, fnty, name)
    fn.linkage = "internal"
    u, a, bb, x8, d8, xs, out, n8, n_groups, k = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    dot = _intrinsic_fn(module, "llvm.x86.avx512.vpdpbusd.512", V16I, [V16I, V16I, V16I])
    c = lambda v: ir.Constant(I64, v)  # noqa: E731
    per_x = b.sdiv(k, c(32))
    izero, fzero = ir.Constant(V16I, None), ir.Constant(V16F, None)
    steps = group // 4

    def v16(ptr, ty):
        return b.load(b.bitcast(ptr, ty.as_pointer()), align=4)

    def token_block(tb, _):
        t0 = b.mul(tb, c(TOKENS))
        rows = [b.add(t0, c(t)) for t in range(TOKENS)]
        x_rows = [b.gep(x8, [b.mul(r, b.mul(k, c(2)))]) for r in rows]

        def digits(t, at):
            return [b.load(b.bitcast(b.gep(x_rows[t], [off]), I32.as_pointer()), align=1) for off in (at, b.add(at, k))]

        def group_step(g, facc):
            e0 = b.mul(g, c(group))
            acc = [izero] * TOKENS
            low = [izero] * TOKENS
            for s in range(steps):
                wv = v16(b.gep(u, [b.mul(b.add(b.mul(g, c(steps)), c(s)), c(64))]), V16I)
                for t in range(TOKENS):
                    xi, xl = digits(t, b.add(e0, c(4 * s)))
                    acc[t] = b.call(dot, [acc[t], wv, _splat(b, xi, 16)])
                    low[t] = b.call(dot, [low[t], wv, _splat(b, xl, 16)])
            acc = [b.add(b.shl(a_, _splat(b, ir.Constant(I32, 8), 16)), l_) for a_, l_ in zip(acc, low)]
            av = v16(b.gep(a, [b.mul(g, c(16))]), V16F)
            bv = v16(b.gep(bb, [b.mul(g, c(16))]), V16F)
            d_at = b.sdiv(e0, c(32))
            new = []
            for t in range(TOKENS):
                d = b.load(b.gep(d8, [b.add(b.mul(rows[t], per_x), d_at)]))
                s_ = b.load(b.gep(xs, [b.add(b.mul(rows[t], n_groups), g)]))
                p = b.fmul(b.fmul(av, _splat(b, d, 16)), b.sitofp(acc[t], V16F))
                v = b.fadd(facc[t], p)
                v = b.fsub(v, b.fmul(bv, _splat(b, s_, 16)))
                for op in (p, v):
                    op.flags.extend(_FAST)
                new.append(v)
            return new

        res = _loop(b, n_groups, group_step, [fzero] * TOKENS)
        for t in range(TOKENS):
            b.store(res[t], b.bitcast(b.gep(out, [b.mul(rows[t], c(16))]), V16F.as_pointer()), align=4)
        return []

    _loop(b, n8, token_block, [])
    b.ret_void()
    return fn


@intrinsic
def _strip(typingctx, group, u, a, b, x8, d8, xs, out):
    """_strip(group (literal 16 or 32), u, a, b, x8, d8, xs, out): the strip kernel on
    C-contiguous arrays; n8 = out rows / 8, n_groups = a rows, k = x8 columns / 2."""
    if not isinstance(group, types.IntegerLiteral) or group.literal_value not in (16, 32):
        return None
    g = group.literal_value
    sig = types.void(group, u, a, b, x8, d8, xs, out)

    def codegen(context, builder, signature, args):
        arrays = [context.make_array(ty)(context, builder, v) for ty, v in zip(signature.args[1:], args[1:])]
        data = [builder.bitcast(arr.data, ptr) for arr, ptr in zip(
            arrays, (I8.as_pointer(), F32.as_pointer(), F32.as_pointer(), I8.as_pointer(),
                     F32.as_pointer(), F32.as_pointer(), F32.as_pointer()))]
        shape = lambda i, d: builder.extract_value(arrays[i].shape, d)  # noqa: E731
        n8 = builder.sdiv(shape(6, 0), ir.Constant(I64, TOKENS))
        fn = _function(builder.module, f"cpuq_qgemm_strip_{g}", lambda m, name: _build_strip_fn(m, name, g))
        builder.call(fn, data + [n8, shape(1, 0), builder.sdiv(shape(3, 1), ir.Constant(I64, 2))])
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, nogil=True)
def qgemm_rows(x8, d8, xs16, xs32, w, ggml_type, r0, r1, out):
    """x8: (n_pad, 2k) int8, each row the two digits of quantize_tokens (x8[:, :k], x8[:, k:]),
    d8, xs16, xs32 as it fills them, n_pad a multiple of 8; w: (m, row_bytes) uint8 of a type
    in TYPES -> out[:, r0:r1] = x @ W[r0:r1].T for out's n rows (n <= n_pad). Shapes that
    do not agree leave out untouched."""
    n_pad = x8.shape[0]
    k = x8.shape[1] // 2
    n = out.shape[0]
    group = group_size(ggml_type)
    r1 = min(r1, w.shape[0], out.shape[1])
    if (n_pad % TOKENS or n > n_pad or k % 32 or x8.shape[1] != 2 * k or d8.shape[0] < n_pad
            or d8.shape[1] < k // 32 or xs16.shape[0] < n_pad or xs16.shape[1] < k // 16
            or xs32.shape[0] < n_pad or xs32.shape[1] < k // 32):
        return
    u = np.empty(k * ROWS, np.uint8)
    a = np.empty((k // group, ROWS), np.float32)
    b = np.empty((k // group, ROWS), np.float32)
    ot = np.empty((n_pad, ROWS), np.float32)
    x8c = np.ascontiguousarray(x8)
    d8c = np.ascontiguousarray(d8[:n_pad, :k // 32])
    xs16c = np.ascontiguousarray(xs16[:n_pad, :k // 16])
    xs32c = np.ascontiguousarray(xs32[:n_pad, :k // 32])
    for s0 in range(r0, r1, ROWS):
        unpack_strip(w, ggml_type, s0, u, a, b)
        if group == 16:
            _strip(16, u, a, b, x8c, d8c, xs16c, ot)
        else:
            _strip(32, u, a, b, x8c, d8c, xs32c, ot)
        rows = min(ROWS, r1 - s0)
        out[:, s0:s0 + rows] = ot[:n, :rows]
