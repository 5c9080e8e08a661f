"""Products of a prompt chunk with quantized weight matrices in 8-bit integers (x86 with
AVX512-VNNI): each token's activations are rounded to two int8 digits per 32 elements, the
weights are unpacked 16 rows at a time into unsigned bytes, and vpdpbusd multiplies 64 byte
pairs per instruction, once per digit.

Why: on this kind of core a 512-bit vpdpbusd issues about once per cycle (64 multiply-adds),
where float32 FMAs give 16 per cycle: the sgemm route (decode a tile to float32, then BLAS)
is bound by the float multiply-adds, this one by unpacking and scales. Why two digits: one
(llama.cpp's Q8 rounding, to 2^-8 of each 32 values' largest |x|) is twice as fast but loses
the small values that share a group with an outlier channel (real models have activations
of ~450 beside ~1); it turned the demo model's "Paris" into nonsense, as it does in llama.cpp.

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

Imports numpy, numba, llvmlite and the sibling kernels.blocks / matmul only.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from ..quants.decode import _half_at, _k_scale_min, _u32_at
from .blocks import F32, I8, I32, I64, V16F, V16I, _FAST, _function, _intrinsic_fn, _loop, _splat, host_cpu_features
from .matmul import BLOCK_BYTES, BLOCK_ELEMS, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0, n_blocks

ROWS = 16  # weight rows per strip: the 16 int32 lanes of a 512-bit register
TOKENS = 8  # tokens per pass over a strip: 8 int32 + 8 float accumulators stay in registers
TYPES = (Q4_K, Q6_K, Q8_0, Q5_0, Q4_0, Q4_1, Q5_1, Q5_K)


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

# Four consecutive elements of a row are one uint32 of the strip (u viewed as uint32:
# (k/4, 16)), so the unpackers move a word of 4 values per step: nibbles by masks, the
# fifth/sixth bits spread from their flag words. ~6x the per-element loops' speed, which
# matters for short prompt chunks (the whole matrix is unpacked whatever the tokens).
_NIBBLES = np.uint32(0x0F0F0F0F)


@njit(cache=True, inline="always")
def _spread4(bits):
    """The low 4 bits of `bits` -> bit 0 of each byte of a uint32 (bit j -> byte j)."""
    return ((bits & np.uint32(15)) * np.uint32(0x00204081)) & np.uint32(0x01010101)


@njit(cache=True, inline="always")
def _unpack_row(ggml_type, src, rr, nb, u32, a, b):
    """Row src (bytes of one weight row) into strip row rr: nb blocks."""
    size = BLOCK_BYTES[ggml_type]
    if ggml_type == Q4_K or ggml_type == Q5_K:
        qs_at = 16 if ggml_type == Q4_K else 48
        for blk in range(nb):
            o = blk * size
            d = _half_at(src, o)
            dmin = _half_at(src, o + 2)
            for sub in range(8):
                scale, minimum = _k_scale_min(src, o + 4, sub)
                g = blk * 8 + sub
                a[g, rr] = d * np.float32(scale)
                b[g, rr] = dmin * np.float32(minimum)
            for pair in range(4):  # 32 bytes: sub-block 2 * pair in the low nibbles, the next in the high
                q_at = o + qs_at + pair * 32
                w0 = (blk * 256 + pair * 64) // 4
                for j in range(8):
                    word = _u32_at(src, q_at + 4 * j)
                    lo = word & _NIBBLES
                    hi = (word >> np.uint32(4)) & _NIBBLES
                    if ggml_type == Q5_K:  # fifth bits: bit s of byte l for sub-block s
                        h = _u32_at(src, o + 16 + 4 * j)
                        lo |= ((h >> np.uint32(2 * pair)) & np.uint32(0x01010101)) << np.uint32(4)
                        hi |= ((h >> np.uint32(2 * pair + 1)) & np.uint32(0x01010101)) << np.uint32(4)
                    u32[(w0 + j) * 16 + rr] = lo
                    u32[(w0 + 8 + j) * 16 + rr] = hi
    elif ggml_type == Q6_K:
        for blk in range(nb):
            o = blk * size
            d = _half_at(src, o + 208)
            for g16 in range(16):
                scale = np.int32(src[o + 192 + g16])
                scale = scale - 256 if scale >= 128 else scale
                a[blk * 16 + g16, rr] = d * np.float32(scale)
                b[blk * 16 + g16, rr] = a[blk * 16 + g16, rr] * np.float32(32.0)
            for half in range(2):
                for quarter in range(4):
                    lo_at = o + half * 64 + (quarter & 1) * 32
                    lo_shift = np.uint32((quarter >> 1) * 4)
                    hi_shift = np.uint32(quarter * 2)
                    w0 = (blk * 256 + half * 128 + quarter * 32) // 4
                    for j in range(8):
                        lo = (_u32_at(src, lo_at + 4 * j) >> lo_shift) & _NIBBLES
                        hi = (_u32_at(src, o + 128 + half * 32 + 4 * j) >> hi_shift) & np.uint32(0x03030303)
                        u32[(w0 + j) * 16 + rr] = lo | (hi << np.uint32(4))
    elif ggml_type == Q8_0:
        for blk in range(nb):
            o = blk * size
            d = _half_at(src, o)
            a[blk, rr] = d
            b[blk, rr] = d * np.float32(128.0)
            for j in range(8):  # int8 q -> q + 128
                u32[(blk * 8 + j) * 16 + rr] = _u32_at(src, o + 2 + 4 * j) ^ np.uint32(0x80808080)
    else:  # Q4_0 Q4_1 Q5_0 Q5_1: [d | m? | qh? | 16 bytes, element j low nibble, j+16 high]
        has_m = ggml_type == Q4_1 or ggml_type == Q5_1
        has_h = ggml_type == Q5_0 or ggml_type == Q5_1
        for blk in range(nb):
            o = blk * size
            d = _half_at(src, o)
            a[blk, rr] = d
            if has_m:
                b[blk, rr] = -_half_at(src, o + 2)
            else:
                b[blk, rr] = d * np.float32(16.0 if has_h else 8.0)
            qh = _u32_at(src, o + 2 + 2 * has_m) if has_h else np.uint32(0)
            qs = o + 2 + 2 * has_m + 4 * has_h
            for j in range(4):
                word = _u32_at(src, qs + 4 * j)
                lo = (word & _NIBBLES) | (_spread4(qh >> np.uint32(4 * j)) << np.uint32(4))
                hi = ((word >> np.uint32(4)) & _NIBBLES) | (_spread4(qh >> np.uint32(16 + 4 * j)) << np.uint32(4))
                u32[(blk * 8 + j) * 16 + rr] = lo
                u32[(blk * 8 + 4 + j) * 16 + rr] = hi


@njit(cache=True, nogil=True)
def unpack_strip(w, ggml_type, r0, u, a, b):
    """Rows r0 .. r0+15 of w (uint8 (m, row_bytes) of a type in TYPES) -> u: (k/4 * 64,)
    uint8, a, b: (k/G, 16) f32, k = u.shape[0] // 16; rows past m and elements past the
    row's whole blocks are zeros."""
    k = u.shape[0] // 16
    u[:] = 0
    a[:] = 0.0
    b[:] = 0.0
    if ggml_type not in TYPES:  # the tables below index by type
        return
    per = a.shape[0] * group_size(ggml_type) // BLOCK_ELEMS[ggml_type]  # blocks the group arrays hold
    nb = min(n_blocks(ggml_type, k, w.shape[1]), per)
    u32 = u[:k * ROWS].view(np.uint32)
    for rr in range(min(ROWS, w.shape[0] - r0)):
        _unpack_row(ggml_type, w[r0 + rr], rr, nb, u32, a, b)


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
