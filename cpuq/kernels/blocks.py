"""GGML blocks as LLVM vector IR, for Numba kernels to call: one row's dot product with a
vector (`dot_row_q`) and one row's float32 values (`decode_row_fast`).

Why IR and not Numba Python: Numba types every integer operation on narrow ints as int64
and wraps signed indices, so its unpacking of 4-, 5- and 6-bit values runs in 8 lanes of
64 bits with gathers, and a 32-element block reduction keeps its accumulators in memory;
the decode kernels written that way read 6-12 GB/s where the memory delivers ~30 GB/s.
Here each type says, in a few vector instructions on <16 x i8> / <32 x i8> values, how
one block becomes <32 x float> groups of values (`_values_<type>`); the row loop around
it (`_build_row_fn`) accumulates x * values in a <32 x float> register or stores the
values. That IR is target-independent (LLVM lowers it to AVX2, AVX-512, NEON...), with no
F16C (fp16 scales are converted with integer ops, exactly). The one ISA-specific piece is
the int16 path of `dot_row_q` (`_ints_<type>`, x86's pmaddwd), taken only where the host
has it.

Values equal quants.decode's (the same products of the same float32 factors, rounded
once); dot products sum in a different order (fast-math 'reassoc' + 'contract' on the
accumulation only), as any BLAS does.

Bounds: the IR functions read nb blocks of the row and nb * QK floats of x (or write them
to dst); the Numba-side wrappers take nb = min(what x/dst hold, what the row holds) and a
row index inside the matrix, so no bytes, however malformed, reach outside the arrays.

Imports numba, llvmlite and cpuq.quants.types (the block sizes) only.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ..quants.types import GGML_TYPES, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0

F32 = ir.FloatType()
I1, I8, I16, I32, I64 = ir.IntType(1), ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
V32F = ir.VectorType(F32, 32)
V32B = ir.VectorType(I8, 32)
V16B = ir.VectorType(I8, 16)
V32S = ir.VectorType(I16, 32)
_FAST = ("reassoc", "contract")  # on the accumulation only: it may be reordered and fused


def _function(module: ir.Module, name: str, build) -> ir.Function:
    """The module's function `name`, built by build(module, name) on first use."""
    try:
        return module.get_global(name)
    except KeyError:
        return build(module, name)


def _vconst(ty: ir.VectorType, value) -> ir.Constant:
    return ir.Constant(ty, [value] * ty.count)


def _splat(b: ir.IRBuilder, value, n: int = 32):
    v = b.insert_element(ir.Constant(ir.VectorType(value.type, n), ir.Undefined), value, ir.Constant(I32, 0))
    return b.shuffle_vector(v, v, ir.Constant(ir.VectorType(I32, n), [0] * n))


def _concat(b: ir.IRBuilder, lo, hi):
    n = lo.type.count
    return b.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(I32, 2 * n), list(range(2 * n))))


def _ptr(b: ir.IRBuilder, base, offset: int, ty):
    """base (i8*) + offset bytes, as a pointer to ty."""
    return b.bitcast(b.gep(base, [ir.Constant(I64, offset)]), ty.as_pointer())


def _load(b: ir.IRBuilder, base, offset: int, ty):
    return b.load(_ptr(b, base, offset, ty), align=1)


def _half(b: ir.IRBuilder, base, offset: int):
    """The little-endian fp16 at base + offset as float, exactly, with integer operations
    (an fpext from half needs F16C or a runtime helper, and with F16C measured slower): a
    normal half's 15 magnitude bits shifted into a float's place, its exponent rebased by
    112; a subnormal half's mantissa converted and scaled by 2^-24 (never a float denormal
    as an operand: on Intel cores one costs a microcode assist, and K-quant scales of
    ordinary weights are often subnormal halves, 1e-5 for Q6_K; decode ran at 40% of its
    speed); all exponent bits set (inf/NaN) map to the float inf/NaN with the same mantissa."""
    h = b.zext(_load(b, base, offset, I16), I32)
    mag = b.shl(b.and_(h, ir.Constant(I32, 0x7FFF)), ir.Constant(I32, 13))
    normal = b.add(mag, ir.Constant(I32, 112 << 23))
    tiny = b.fmul(b.sitofp(b.and_(h, ir.Constant(I32, 0x3FF)), F32), ir.Constant(F32, 2.0 ** -24))
    subnormal = b.icmp_unsigned("<", mag, ir.Constant(I32, 1 << 23))
    special = b.icmp_unsigned(">=", mag, ir.Constant(I32, 0x7C00 << 13))
    bits = b.select(special, b.or_(mag, ir.Constant(I32, 0x7F800000)),
                    b.select(subnormal, b.bitcast(tiny, I32), normal))
    sign = b.shl(b.and_(h, ir.Constant(I32, 0x8000)), ir.Constant(I32, 16))
    return b.bitcast(b.or_(bits, sign), F32)


def _loop(b: ir.IRBuilder, count, body, state):
    """for i in range(count): state = body(i, state), at the builder's position (nothing
    runs when count <= 0) -> the final state; state: a list of LLVM values (phis)."""
    pre = b.block
    loop, done = b.append_basic_block("loop"), b.append_basic_block("done")
    b.cbranch(b.icmp_signed(">", count, ir.Constant(count.type, 0)), loop, done)
    b.position_at_end(loop)
    i = b.phi(count.type)
    i.add_incoming(ir.Constant(count.type, 0), pre)
    phis = [b.phi(v.type) for v in state]
    for phi, v in zip(phis, state):
        phi.add_incoming(v, pre)
    new = body(i, phis)
    nxt = b.add(i, ir.Constant(count.type, 1))
    end = b.block
    i.add_incoming(nxt, end)
    for phi, v in zip(phis, new):
        phi.add_incoming(v, end)
    b.cbranch(b.icmp_signed("<", nxt, count), loop, done)
    b.position_at_end(done)
    final = []
    for v0, v1 in zip(state, new):  # every phi first, as LLVM requires
        r = b.phi(v0.type)
        r.add_incoming(v0, pre)
        r.add_incoming(v1, end)
        final.append(r)
    return final


# Bytes ahead of the block being multiplied that a row product asks the cache for: with
# the rows in DRAM (a MoE token's experts, any model bigger than the last-level cache) the
# hardware prefetchers alone left the kernels at ~half the read bandwidth (a Qwen3-30B-A3B
# token's 8 Q4_K experts 8.5 -> 15 GB/s on 2 threads; 512 B ahead 13, 2-4 KiB 13.4-14.5).
PREFETCH_AHEAD = 1024


def _prefetch(b: ir.IRBuilder, blk, nbytes: int):
    """Ask for the cache lines PREFETCH_AHEAD bytes past a block of nbytes. A prefetch is a
    hint that reads nothing into the result and never faults, so past a row's or a
    buffer's end it costs nothing but the request."""
    fn = _intrinsic_fn(b.module, "llvm.prefetch.p0", ir.VoidType(), [I8.as_pointer(), I32, I32, I32])
    for o in range(0, nbytes, 64):
        b.call(fn, [b.gep(blk, [ir.Constant(I64, PREFETCH_AHEAD + o)]),
                    ir.Constant(I32, 0), ir.Constant(I32, 3), ir.Constant(I32, 1)])  # read, keep, data


def _byte(b: ir.IRBuilder, base, offset: int):
    return b.zext(_load(b, base, offset, I8), I32)


def _nibbles(b: ir.IRBuilder, qs):
    """<n x i8> bytes -> (low nibbles, high nibbles), each <n x i8>."""
    n = qs.type.count
    return b.and_(qs, _vconst(ir.VectorType(I8, n), 15)), b.lshr(qs, _vconst(ir.VectorType(I8, n), 4))


def _to_float(b: ir.IRBuilder, q, signed: bool):
    return (b.sitofp if signed else b.uitofp)(q, ir.VectorType(F32, q.type.count))


def _scaled(b: ir.IRBuilder, qf, d, m=None):
    """qf * d (+ m), d and m scalars."""
    v = b.fmul(qf, _splat(b, d, qf.type.count))
    return v if m is None else b.fadd(v, _splat(b, m, qf.type.count))


def _high_bits(b: ir.IRBuilder, qh32, shift: int):
    """A little-endian uint32 of 32 one-bit flags -> <32 x i8> holding flag << shift."""
    bits = b.zext(b.bitcast(qh32, ir.VectorType(I1, 32)), V32B)
    return b.shl(bits, _vconst(V32B, shift))


# ---------------------------------------------------------------------------------------------
# One block's stored integers in element order, as <32 x i8> groups (also kernels.qgemm's).

def _q4_ints(b, w, qs_at: int):
    """16 bytes at w + qs_at: element j in the low nibble of byte j, j + 16 in the high."""
    return _concat(b, *_nibbles(b, _load(b, w, qs_at, V16B)))


def _q5_ints(b, w, qh_at: int, qs_at: int):
    """_q4_ints with each element's fifth bit from the flag word at w + qh_at."""
    return b.or_(_q4_ints(b, w, qs_at), _high_bits(b, _load(b, w, qh_at, I32), 4))


def _k_ints(b, w, qs_at: int, qh_at: int | None = None):
    """The 8 sub-blocks of a Q4_K (qs at 16) or Q5_K (qs at 48, fifth bits in the 32 qh bytes at
    16: bit j of byte l for sub-block j) block: 4 x 32 bytes, sub-block 2 * pair in the low
    nibbles, the next in the high."""
    qh = None if qh_at is None else _load(b, w, qh_at, V32B)
    out = []
    for pair in range(4):
        for j, q in zip((2 * pair, 2 * pair + 1), _nibbles(b, _load(b, w, qs_at + 32 * pair, V32B))):
            if qh is not None:
                bit = b.and_(b.lshr(qh, _vconst(V32B, j)), _vconst(V32B, 1))
                q = b.or_(q, b.shl(bit, _vconst(V32B, 4)))
            out.append(q)
    return out


# ---------------------------------------------------------------------------------------------
# One block -> its values as <32 x float> groups, in element order (ggml-common.h layouts).

def _values_q8_0(b, w):  # [d f16 | 32 x int8]
    return [_scaled(b, _to_float(b, _load(b, w, 2, V32B), True), _half(b, w, 0))]


def _values_q4_0(b, w):  # [d | 16 bytes: element j low nibble of byte j, j+16 high]; d * (q - 8)
    q = b.sub(_q4_ints(b, w, 2), _vconst(V32B, 8))
    return [_scaled(b, _to_float(b, q, True), _half(b, w, 0))]


def _values_q4_1(b, w):  # [d | m | 16 bytes]; d * q + m
    return [_scaled(b, _to_float(b, _q4_ints(b, w, 4), False), _half(b, w, 0), _half(b, w, 2))]


def _values_q5_0(b, w):  # [d | qh u32: bit j = 5th bit of element j | 16 bytes]; d * (q - 16)
    q = _q5_ints(b, w, 2, 6)
    return [_scaled(b, _to_float(b, b.sub(q, _vconst(V32B, 16)), True), _half(b, w, 0))]


def _values_q5_1(b, w):  # [d | m | qh u32 | 16 bytes]; d * q + m
    return [_scaled(b, _to_float(b, _q5_ints(b, w, 4, 8), False), _half(b, w, 0), _half(b, w, 2))]


def _k_scale_min(b, w, s: int, j: int):
    """6-bit (scale, min) of sub-block j from the 12 packed bytes at w + s."""
    c63, c15, c6, c4 = (ir.Constant(I32, v) for v in (63, 15, 6, 4))
    if j < 4:
        return b.and_(_byte(b, w, s + j), c63), b.and_(_byte(b, w, s + j + 4), c63)
    packed = _byte(b, w, s + j + 4)
    scale = b.or_(b.and_(packed, c15), b.shl(b.lshr(_byte(b, w, s + j - 4), c6), c4))
    minimum = b.or_(b.lshr(packed, c4), b.shl(b.lshr(_byte(b, w, s + j), c6), c4))
    return scale, minimum


def _k_sub_values(b, qf, d, dmin, scale, minimum):
    """(d * scale) * q - (dmin * min), the K-quant sub-block formula (as quants.decode)."""
    ds = b.fmul(d, b.uitofp(scale, F32))
    dm = b.fmul(dmin, b.uitofp(minimum, F32))
    return b.fsub(b.fmul(qf, _splat(b, ds)), _splat(b, dm))


def _values_q4_k(b, w):  # [d | dmin | 12 scale bytes | 128 bytes: 4 x (32 low | 32 high nibbles)]
    d, dmin = _half(b, w, 0), _half(b, w, 2)
    return [_k_sub_values(b, _to_float(b, q, False), d, dmin, *_k_scale_min(b, w, 4, j))
            for j, q in enumerate(_k_ints(b, w, 16))]


def _values_q5_k(b, w):  # [d | dmin | 12 scale bytes | qh 32 bytes | 128 nibble bytes]
    d, dmin = _half(b, w, 0), _half(b, w, 2)
    return [_k_sub_values(b, _to_float(b, q, False), d, dmin, *_k_scale_min(b, w, 4, j))
            for j, q in enumerate(_k_ints(b, w, 48, qh_at=16))]


def _q6_k_groups(b, w, offset: int = 32):
    """The 8 groups of 32 6-bit values q - offset of a Q6_K block (q - 32: the signed
    values; 0: q as stored, 0..63), in element order: group 4 * half + quarter takes its low
    4 bits from ql and bits 2*quarter.. of qh."""
    for half in range(2):
        ql_a, ql_b = _load(b, w, 64 * half, V32B), _load(b, w, 64 * half + 32, V32B)
        qh = _load(b, w, 128 + 32 * half, V32B)
        lo_a, hi_a = _nibbles(b, ql_a)
        lo_b, hi_b = _nibbles(b, ql_b)
        for quarter, nib in enumerate((lo_a, lo_b, hi_a, hi_b)):
            top = b.and_(b.lshr(qh, _vconst(V32B, 2 * quarter)), _vconst(V32B, 3))
            yield 4 * half + quarter, b.sub(b.or_(nib, b.shl(top, _vconst(V32B, 4))), _vconst(V32B, offset))


def _values_q6_k(b, w):  # [ql 128 | qh 64 | 16 int8 scales | d]; element groups of 16 share a scale
    d = _half(b, w, 208)
    lanes_hi = ir.Constant(ir.VectorType(I1, 32), [j >= 16 for j in range(32)])
    out = []
    for g, q in _q6_k_groups(b, w):
        s0 = b.fmul(d, b.sitofp(_load(b, w, 192 + 2 * g, I8), F32))
        s1 = b.fmul(d, b.sitofp(_load(b, w, 192 + 2 * g + 1, I8), F32))
        scale = b.select(lanes_hi, _splat(b, s1), _splat(b, s0))
        out.append(b.fmul(_to_float(b, q, True), scale))
    return out


# ggml type id -> values builder; elements and bytes per block come from types.GGML_TYPES.
BLOCK_IR = {Q8_0: _values_q8_0, Q4_0: _values_q4_0, Q4_1: _values_q4_1, Q5_0: _values_q5_0, Q5_1: _values_q5_1,
            Q4_K: _values_q4_k, Q5_K: _values_q5_k, Q6_K: _values_q6_k}


# ---------------------------------------------------------------------------------------------
# One block -> its integer values for the int16-activation dot products. Each builder gets
# the block (w) and x's group scales and sums for it (dx, xsum: float* at the block's first
# 32-element group) and returns ([(q <32 x i8>, scale) per group], minimum): the block's
# dot product is sum over groups of pmaddwd(q, xq) * scale (scale includes dx: a float,
# or a <16 x float> with one per pmaddwd lane, a lane holding elements 2i and 2i+1, when
# a group's halves have their own scales) minus `minimum`, a <8 x float> whose sum is the
# K-quants' min terms (or None).



def _ints_q8_0(b, w, dx, xsum):
    return _load(b, w, 2, V32B), _splat(b, b.fmul(_half(b, w, 0), b.load(dx)), 16)


def _ints_q5_0(b, w, dx, xsum):
    return b.sub(_q5_ints(b, w, 2, 6), _vconst(V32B, 16)), _splat(b, b.fmul(_half(b, w, 0), b.load(dx)), 16)


def _pick(b, v, idx):
    return b.shuffle_vector(v, v, ir.Constant(ir.VectorType(I32, len(idx)), idx))


def _k_scales_mins(b, w):
    """The 8 6-bit (scale, min) pairs of a Q4_K/Q5_K block from the 12 bytes at w + 4, all
    at once (as quants' get_scale_min_k4; lane j = sub-block j) -> two <8 x i8>; the
    16-byte load ends inside the block."""
    v8b = ir.VectorType(I8, 8)
    raw = _load(b, w, 4, V16B)
    first = ir.Constant(ir.VectorType(I1, 8), [j < 4 for j in range(8)])
    lows = _pick(b, raw, [0, 1, 2, 3, 8, 9, 10, 11])    # scale bits: b[j] (j < 4), b[j + 4]
    tops = _pick(b, raw, [0, 0, 0, 0, 0, 1, 2, 3])      # b[j - 4]: scale bits 4-5 for j >= 4
    mins = _pick(b, raw, [4, 5, 6, 7, 8, 9, 10, 11])    # min bits: b[j + 4]
    mtops = _pick(b, raw, [0, 0, 0, 0, 4, 5, 6, 7])     # b[j]: min bits 4-5 for j >= 4
    c = lambda v: _vconst(v8b, v)  # noqa: E731
    scale = b.select(first, b.and_(lows, c(63)),
                     b.or_(b.and_(lows, c(15)), b.shl(b.lshr(tops, c(6)), c(4))))
    minimum = b.select(first, b.and_(mins, c(63)),
                       b.or_(b.lshr(mins, c(4)), b.shl(b.lshr(mtops, c(6)), c(4))))
    return scale, minimum


def _lanes16(lo: int, hi: int) -> ir.Constant:
    """<32 x i16>: lo in lanes 0-15, hi in lanes 16-31."""
    return ir.Constant(V32S, [lo] * 16 + [hi] * 16)


def _sum_q4_k(b, w, xp, xsum):
    """Q4_K read as <32 x i16> words: word i of the 64 bytes of a half-block holds two bytes,
    so `& 15`, `>> 8 & 15`, `>> 4 & 15` and `>> 12` give the even and odd elements of two
    groups each, in i16 lanes with no shuffles (x comes in the matching order, X_ORDERS).
    pmaddwd sums lane pairs of one group, so each lane takes one scale, in float: a
    multiply-add where vpmulld's two port-0 uops made the kernel port-0 bound (llvm-mca;
    streaming Q4_K rows 9 -> 13-16 GB/s on two threads)."""
    scale, minimum = _k_scales_mins(b, w)
    xsum8 = b.load(b.bitcast(xsum, V8F.as_pointer()), align=4)
    mterm = b.fmul(b.fmul(_splat(b, _half(b, w, 2), 8), b.uitofp(minimum, V8F)), xsum8)
    sc32 = b.uitofp(scale, V8F)  # float scales: a vpmulld is two port-0 uops, a float multiply-add one
    acc = None
    for h in range(2):
        q = _load(b, w, 16 + 64 * h, V32S)
        parts = (b.and_(q, _vconst(V32S, 15)), b.and_(b.lshr(q, _vconst(V32S, 8)), _vconst(V32S, 15)),
                 b.and_(b.lshr(q, _vconst(V32S, 4)), _vconst(V32S, 15)), b.lshr(q, _vconst(V32S, 12)))
        acc = _scaled_pairs(b, acc, parts, xp, h, sc32, [[4 * h] * 8 + [4 * h + 2] * 8,
                                                          [4 * h + 1] * 8 + [4 * h + 3] * 8])
    return acc, _half(b, w, 0), mterm


def _sum_q6_k(b, w, xp, xsum):
    """Q6_K as _sum_q4_k. A half-block's 64 ql bytes hold quarters 0|1 in their low nibbles
    and 2|3 in their high ones; its 32 qh bytes, in both halves of a register, give each
    quarter's top 2 bits at bits 4-5 of the byte by one word shift per register half and a
    mask. That makes two registers of 6-bit values, one per byte, whose words' low and high
    bytes are the four (group, parity) sets. Scales are per 16 elements: 4 per i32 lane set,
    applied to the int16 values (see _scaled_pairs)."""
    sc16 = b.sext(_load(b, w, 192, V16B), ir.VectorType(I16, 16))
    v16s = ir.VectorType(I16, 16)
    nibbles, tops, low_byte = _vconst(V32S, 0x0F0F), _vconst(V32S, 0x3030), _vconst(V32S, 0x00FF)
    acc = None
    for h in range(2):
        ql = _load(b, w, 64 * h, V32S)
        qh16 = _load(b, w, 128 + 32 * h, v16s)
        qh = _concat(b, qh16, qh16)
        q01 = b.or_(b.and_(ql, nibbles), b.and_(b.shl(qh, _lanes16(4, 2)), tops))
        q23 = b.or_(b.and_(b.lshr(ql, _vconst(V32S, 4)), nibbles), b.and_(b.lshr(qh, _lanes16(0, 2)), tops))
        sets = (b.and_(q01, low_byte), b.lshr(q01, _vconst(V32S, 8)), b.and_(q23, low_byte),
                b.lshr(q23, _vconst(V32S, 8)))
        parts = [b.sub(q, _vconst(V32S, 32)) for q in sets]
        s = 8 * h
        acc = _scaled_pairs(b, acc, parts, xp, h, sc16, [[s] * 4 + [s + 1] * 4 + [s + 2] * 4 + [s + 3] * 4,
                                                          [s + 4] * 4 + [s + 5] * 4 + [s + 6] * 4 + [s + 7] * 4])
    return acc, _half(b, w, 208), None


def _scaled_pairs(b, acc, parts, xp, h, scales, picks):
    """acc + sum over the two sets (parts 0+1, parts 2+3) of pmaddwd(parts, x) * scales[pick]:
    parts are half-block h's four <32 x i16> value sets in X_ORDERS' order, picks[set] the
    scale of each i32 lane. float scales (Q4_K) multiply the lanes' sums converted to float
    (exact: |sum| < 2^21), added in float; i32 scales the lanes' sums (vpmulld); i16 scales
    (Q6_K: |q * scale| <= 32 * 128) multiply the values before pmaddwd (vpmullw), which keeps
    a block one multiply-add chain: faster for Q6_K, where Q4_K, with twice the vpmullw of
    its vpmulld, got slower."""
    for s in range(2):
        xs = [b.load(b.bitcast(b.gep(xp, [ir.Constant(I64, (4 * h + 2 * s + k) * 32)]), V32S.as_pointer()), align=2)
              for k in range(2)]
        if scales.type.element == I16:
            scale = _pick(b, scales, [p for p in picks[s] for _ in range(2)])  # both i16 lanes of a pair
            for k in range(2):
                t = _pmaddwd(b, b.mul(parts[2 * s + k], scale), xs[k])
                acc = t if acc is None else b.add(acc, t)
            continue
        t = b.add(_pmaddwd(b, parts[2 * s], xs[0]), _pmaddwd(b, parts[2 * s + 1], xs[1]))
        if scales.type.element == F32:  # |t| < 2^21: exact as a float
            term = b.fmul(b.sitofp(t, V16F), _pick(b, scales, picks[s]))
            term.flags.extend(_FAST)
            acc = term if acc is None else b.fadd(acc, term)
            acc.flags.extend(_FAST)
            continue
        term = b.mul(t, _pick(b, scales, picks[s]))
        acc = term if acc is None else b.add(acc, term)
    return acc


def _x_order(sets) -> "list[int]":
    """The element order of x that _sum_q4_k/_sum_q6_k read: for each half-block h and
    value set (group per lane half, parity), 32 lanes: lanes 0-15 even/odd elements of the
    first group, 16-31 of the second."""
    order = []
    for h in range(2):
        for g_lo, g_hi, parity in sets:
            for lane in range(32):
                g = 4 * h + (g_lo if lane < 16 else g_hi)
                order.append(32 * g + 2 * (lane % 16) + parity)
    return order


# ggml type id -> integer-values builder, for the types decode steps spend their time in.
# Legacy blocks (one group): (w, dx, xsum) -> (q <32 x i8>, <16 x float> scale, dx included).
BLOCK_INTS = {Q8_0: _ints_q8_0, Q5_0: _ints_q5_0}
# K-quant superblocks: (w, x (i16*, the block's 256 values in X_ORDERS[type]), xsum) ->
# (<16 x i32> (Q6_K) or <16 x float> (Q4_K, its scales applied in float) sum of x times the
# block's integers times their small scales, d, minimum terms or None). No overflow in int32: 16 products per lane, each <= 32 * 128 * 32767 in
# magnitude, sum < 2^31; converted once per block, when x's groups share one scale per 256
# elements (matvec.quantize_x gives that when k is a multiple of 256, as every K-quant row is).
BLOCK_K_INTS = {Q4_K: _sum_q4_k, Q6_K: _sum_q6_k}
# The value sets of a half-block as the K builders read them: (group in lanes 0-15, group
# in lanes 16-31, parity), groups relative to the half-block; X_ORDERS: the x index of
# each of a block's 256 positions in that order.
X_SETS = {Q4_K: [(0, 2, 0), (0, 2, 1), (1, 3, 0), (1, 3, 1)], Q6_K: [(0, 1, 0), (0, 1, 1), (2, 3, 0), (2, 3, 1)]}
X_ORDERS = {t: _x_order(sets) for t, sets in X_SETS.items()}
X_ORDER_ROW = {Q4_K: 1, Q6_K: 2}  # the row of matvec's xq that holds each order (0: natural)


def host_cpu_features() -> dict:
    """The host CPU's features as LLVM names them ({"avx2": True, ...}); empty where
    llvmlite cannot tell."""
    try:
        import llvmlite.binding as llvm
        return dict(llvm.get_host_cpu_features())
    except Exception:
        return {}


def _host_pmaddwd() -> int:
    """Vector width (int16 lanes) of x86's multiply-add of int16 pairs on this host: 32
    with AVX-512BW, 16 with AVX2, 0 elsewhere (then every type takes the float path)."""
    features = host_cpu_features()
    if features.get("avx512bw"):
        return 32
    if features.get("avx2"):
        return 16
    return 0


PMADDWD_LANES = _host_pmaddwd()
V16I = ir.VectorType(I32, 16)
V16F = ir.VectorType(F32, 16)
V8F = ir.VectorType(F32, 8)


def _pmaddwd(b: ir.IRBuilder, a, c):
    """<32 x i16> a, c -> <16 x i32>: lane i = a[2i] c[2i] + a[2i+1] c[2i+1] (exact; the
    x86 instruction, which LLVM does not form from the generic multiply-add pattern)."""
    if PMADDWD_LANES == 32:
        return b.call(_intrinsic_fn(b.module, "llvm.x86.avx512.pmaddw.d.512", V16I, [V32S, V32S]), [a, c])
    v16s, v8i = ir.VectorType(I16, 16), ir.VectorType(I32, 8)
    fn = _intrinsic_fn(b.module, "llvm.x86.avx2.pmadd.wd", v8i, [v16s, v16s])
    halves = []
    for lo in (0, 16):
        idx = ir.Constant(ir.VectorType(I32, 16), list(range(lo, lo + 16)))
        halves.append(b.call(fn, [b.shuffle_vector(a, a, idx), b.shuffle_vector(c, c, idx)]))
    return _concat(b, *halves)


def _intrinsic_fn(module: ir.Module, name: str, ret, args) -> ir.Function:
    return _function(module, name, lambda m, n: ir.Function(m, ir.FunctionType(ret, args), n))


def _build_dot_i16_fn(module: ir.Module, name: str, ggml_type: int) -> ir.Function:
    """float name(i16* xq, float* dx, float* xsum, i8* w, i64 nb): the dot product of nb
    blocks with x given per 32-element group g as xq[32g:32g+32] * dx[g] (int16, see
    matvec's quantize_x; K-quants read each block's 256 values in X_ORDERS[type]) and
    xsum[g] = the group's float sum (for the minimum terms)."""
    qk, nbytes = GGML_TYPES[ggml_type].block_size, GGML_TYPES[ggml_type].type_size
    groups = qk // 32
    fnty = ir.FunctionType(F32, [I16.as_pointer(), F32.as_pointer(), F32.as_pointer(), I8.as_pointer(), I64])
    fn = ir.Function(module, fnty, name)
    fn.linkage = "internal"
    xq, dx, xsum, w, nb = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))

    def block(i, state):
        acc, macc = state
        blk = b.gep(w, [b.mul(i, ir.Constant(I64, nbytes))])
        _prefetch(b, blk, nbytes)
        g0 = b.mul(i, ir.Constant(I64, groups))

        def x_group(g):
            at = b.mul(b.add(g0, ir.Constant(I64, g)), ir.Constant(I64, 32))
            return b.load(b.bitcast(b.gep(xq, [at]), V32S.as_pointer()), align=2)

        if ggml_type in BLOCK_K_INTS:
            xblk = b.gep(xq, [b.mul(g0, ir.Constant(I64, 32))])
            isum, d, minimum = BLOCK_K_INTS[ggml_type](b, blk, xblk, b.gep(xsum, [g0]))
            scale = _splat(b, b.fmul(d, b.load(b.gep(dx, [g0]))), 16)
            t = b.fmul(isum if isum.type == V16F else b.sitofp(isum, V16F), scale)
        else:
            q, scale = BLOCK_INTS[ggml_type](b, blk, b.gep(dx, [g0]), b.gep(xsum, [g0]))
            t = b.fmul(b.sitofp(_pmaddwd(b, b.sext(q, V32S), x_group(0)), V16F), scale)
            minimum = None
        new = b.fadd(acc, t)
        t.flags.extend(_FAST)
        new.flags.extend(_FAST)
        if minimum is not None:
            macc = b.fadd(macc, minimum)
            macc.flags.extend(_FAST)
        return [new, macc]

    res, mres = _loop(b, nb, block, [ir.Constant(V16F, None), ir.Constant(V8F, None)])
    b.ret(b.fsub(_reduce(b, res), _reduce(b, mres)))
    return fn


# ---------------------------------------------------------------------------------------------
# The row loops.

def _reduce(b: ir.IRBuilder, v):
    n = v.type.count
    while n > 1:
        n //= 2
        lo = b.shuffle_vector(v, v, ir.Constant(ir.VectorType(I32, n), list(range(n))))
        hi = b.shuffle_vector(v, v, ir.Constant(ir.VectorType(I32, n), list(range(n, 2 * n))))
        v = b.fadd(lo, hi)
        v.flags.extend(_FAST)
    return b.extract_element(v, ir.Constant(I32, 0))


def _build_row_fn(module: ir.Module, name: str, ggml_type: int, dot: bool) -> ir.Function:
    """dot:   float name(float* x, i8* w, i64 nb) = sum over nb blocks of x * values
    decode: void name(float* dst, i8* w, i64 nb)  dst[0 : nb * QK] = values"""
    qk, nbytes, values = GGML_TYPES[ggml_type].block_size, GGML_TYPES[ggml_type].type_size, BLOCK_IR[ggml_type]
    fnty = ir.FunctionType(F32 if dot else ir.VoidType(), [F32.as_pointer(), I8.as_pointer(), I64])
    fn = ir.Function(module, fnty, name)
    fn.linkage = "internal"
    xs, w, nb = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))

    def block(i, state):
        acc, = state
        blk = b.gep(w, [b.mul(i, ir.Constant(I64, nbytes))])
        if dot:
            _prefetch(b, blk, nbytes)
        xb = b.gep(xs, [b.mul(i, ir.Constant(I64, qk))])
        for g, v in enumerate(values(b, blk)):
            p = b.bitcast(b.gep(xb, [ir.Constant(I64, 32 * g)]), V32F.as_pointer())
            if dot:
                t = b.fmul(b.load(p, align=4), v)
                acc = b.fadd(acc, t)
                t.flags.extend(_FAST)
                acc.flags.extend(_FAST)
            else:
                b.store(v, p, align=4)
        return [acc]

    res, = _loop(b, nb, block, [ir.Constant(V32F, None)])
    if dot:
        b.ret(_reduce(b, res))
    else:
        b.ret_void()
    return fn


def _row_fn(module: ir.Module, ggml_type: int, dot: bool) -> ir.Function:
    return _function(module, f"cpuq_{'dot' if dot else 'decode'}_row_{ggml_type}",
                     lambda m, name: _build_row_fn(m, name, ggml_type, dot))


def _row_pointer(context, builder, aryty, ary, r):
    """Address of row r of a 2-D array."""
    a = context.make_array(aryty)(context, builder, ary)
    stride0 = cgutils.unpack_tuple(builder, a.strides)[0]
    base = builder.bitcast(a.data, I8.as_pointer())
    return builder.gep(base, [builder.mul(r, stride0)])


def _by_type(builder: ir.IRBuilder, ggml_type, emit, ret_type=None):
    """emit(t) for the literal ggml type t, or, for a type known only at run time, an LLVM
    switch over every type in BLOCK_IR (other values: nothing, or 0 for ret_type)."""
    if isinstance(ggml_type, int):
        return emit(ggml_type)
    other, done = builder.append_basic_block("type_other"), builder.append_basic_block("type_done")
    switch = builder.switch(ggml_type, other)
    results = []
    for t in BLOCK_IR:
        case = builder.append_basic_block(f"type_{t}")
        switch.add_case(ir.Constant(ggml_type.type, t), case)
        builder.position_at_end(case)
        value = emit(t)
        results.append((value, builder.block))
        builder.branch(done)
    builder.position_at_end(other)
    builder.branch(done)
    builder.position_at_end(done)
    if ret_type is None:
        return None
    phi = builder.phi(ret_type)
    for value, block in results:
        phi.add_incoming(value, block)
    phi.add_incoming(ir.Constant(ret_type, 0), other)
    return phi


def _type_arg(ggml_type):
    """The intrinsics' type argument: a literal in BLOCK_IR, or any integer (switch)."""
    if isinstance(ggml_type, types.IntegerLiteral):
        return ggml_type.literal_value in BLOCK_IR
    return isinstance(ggml_type, types.Integer)


@intrinsic
def decode_row_fast(typingctx, ggml_type, w, r, dst, nb):
    """decode_row_fast(ggml_type, w, r, dst, nb): dst[:nb*QK] = values of the first nb
    blocks of row r of w (a type in BLOCK_IR; others leave dst alone). The caller
    guarantees 0 <= r < m and nb within both arrays."""
    if not _type_arg(ggml_type):
        return None
    literal = getattr(ggml_type, "literal_value", None)
    sig = types.void(ggml_type, w, types.intp, dst, types.intp)

    def codegen(context, builder, signature, args):
        tv, wv, rv, dv, nbv = args
        row = _row_pointer(context, builder, signature.args[1], wv, rv)
        da = context.make_array(signature.args[3])(context, builder, dv)
        _by_type(builder, tv if literal is None else literal,
                 lambda t: builder.call(_row_fn(builder.module, t, False), [da.data, row, nbv]))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def dot_row_q(typingctx, ggml_type, x, xq, dx, xsum, w, r, nb):
    """dot_row_q(ggml_type, x, xq, dx, xsum, w, r, nb) -> float32: sum over the first nb
    blocks of row r of w (uint8 (m, row_bytes) of a type in BLOCK_IR; others give 0) times
    x (f32, >= nb*QK), which is also given as int16 groups (xq: (3, >= nb*QK), dx, xsum
    from matvec.quantize_x; xq's rows 1 and 2 in X_ORDERS for Q4_K and Q6_K). Types in
    BLOCK_INTS / BLOCK_K_INTS on a host with pmaddwd (PMADDWD_LANES > 0) multiply in
    integers; others multiply the float values with x. The caller guarantees 0 <= r < m,
    xq's 3 rows and nb within all the arrays."""
    if not _type_arg(ggml_type) or not (isinstance(xq, types.Array) and xq.ndim == 2):
        return None
    literal = getattr(ggml_type, "literal_value", None)
    sig = types.float32(ggml_type, x, xq, dx, xsum, w, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        tv, xv, xqv, dxv, xsv, wv, rv, nbv = args
        data = [context.make_array(aty)(context, builder, v).data
                for aty, v in zip(signature.args[1:5], (xv, xqv, dxv, xsv))]
        row = _row_pointer(context, builder, signature.args[5], wv, rv)

        def emit(t):
            if PMADDWD_LANES and (t in BLOCK_INTS or t in BLOCK_K_INTS):
                fn = _function(builder.module, f"cpuq_dot_i16_row_{t}", lambda m, name: _build_dot_i16_fn(m, name, t))
                order = ir.Constant(I64, X_ORDER_ROW.get(t, 0))
                xrow = _row_pointer(context, builder, signature.args[2], xqv, order)
                return builder.call(fn, [builder.bitcast(xrow, I16.as_pointer()), data[2], data[3], row, nbv])
            return builder.call(_row_fn(builder.module, t, True), [data[0], row, nbv])

        return _by_type(builder, tv if literal is None else literal, emit, F32)

    return sig, codegen


def _build_order_fn(module: ir.Module, name: str) -> ir.Function:
    """void name(i16* src, i16* dst1, i16* dst2, i64 nb): dst1 and dst2 = each of nb blocks
    of 256 values of src in X_ORDERS[Q4_K] and X_ORDERS[Q6_K]: one two-register shuffle
    (vpermt2w) per 32 values, as the sets are pairs of groups' even or odd elements."""
    p16 = I16.as_pointer()
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [p16, p16, p16, I64]), name)
    fn.linkage = "internal"
    src, dst1, dst2, nb = fn.args
    rows = {1: dst1, 2: dst2}
    b = ir.IRBuilder(fn.append_basic_block("entry"))

    def vec(base, i, j):
        at = b.add(b.mul(i, ir.Constant(I64, 256)), ir.Constant(I64, 32 * j))
        return b.bitcast(b.gep(base, [at]), V32S.as_pointer())

    def block(i, state):
        groups = [b.load(vec(src, i, g), align=2) for g in range(8)]
        for t, row in X_ORDER_ROW.items():
            for h in range(2):
                for k, (g_lo, g_hi, parity) in enumerate(X_SETS[t]):
                    idx = ir.Constant(ir.VectorType(I32, 32), [2 * lane + parity for lane in range(16)]
                                      + [32 + 2 * lane + parity for lane in range(16)])
                    v = b.shuffle_vector(groups[4 * h + g_lo], groups[4 * h + g_hi], idx)
                    b.store(v, vec(rows[row], i, 4 * h + k), align=2)
        return []

    _loop(b, nb, block, [])
    b.ret_void()
    return fn


@intrinsic
def order_x(typingctx, xq):
    """order_x(xq): xq (3, n) int16; rows 1 and 2 of each whole 256 values = row 0's in
    X_ORDERS[Q4_K] and X_ORDERS[Q6_K] (the rest of them is left alone). Needs 3 rows."""
    if not (isinstance(xq, types.Array) and xq.ndim == 2 and xq.dtype == types.int16):
        return None
    sig = types.void(xq)

    def codegen(context, builder, signature, args):
        aty, = signature.args
        a = context.make_array(aty)(context, builder, args[0])
        rows = [builder.bitcast(_row_pointer(context, builder, aty, args[0], ir.Constant(I64, r)), I16.as_pointer())
                for r in range(3)]
        n = cgutils.unpack_tuple(builder, a.shape)[1]
        nb = builder.sdiv(n, ir.Constant(I64, 256))
        fn = _function(builder.module, "cpuq_order_x", _build_order_fn)
        builder.call(fn, [*rows, nb])
        return context.get_dummy_value()

    return sig, codegen
