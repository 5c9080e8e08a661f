"""Scale searches shared by the block quantizers, and the float helpers they rest on.

Each search reproduces one of llama.cpp's (ggml-quants.c) bit for bit: the same float32
operations in the same order, so the encoders built on them write the same bytes as
`ggml_quantize_chunk`.

  f32_bits(v)                    the IEEE bits of a float32, as int32
  nearest_int(v)                 ggml's nearest_int: round half to even via the 1.5 * 2**23 trick
  level(v, lo, hi)               nearest_int clamped to [lo, hi], as float32 (the search loops')
  round_half_away(v)             C roundf
  fp32_to_fp16_bits / fp16_bits_to_fp32   GGML_FP32_TO_FP16 / GGML_FP16_TO_FP32
  make_qx_quants                 symmetric scale, +-nmax levels, 18 trial scales (rmse_type 1)
  make_qkx_quants                scale and min, [0, nmax] levels (make_qkx2_quants and
                                 make_qkx3_quants with weights: the same arithmetic)
  make_qp_quants                 positive-only scale for the 6-bit sub-block scales of Q4_K/Q5_K

The group searches work on many independent groups at once ("lanes"): x and the weights are
(n, groups), column g being one group of n values. Every lane still accumulates its own sums
in llama.cpp's order, one element after the other, so the results are unchanged; what changes
is that the innermost loops run across groups, which LLVM turns into SIMD code, instead of
along one serial chain of float additions.

Imports only numpy, numba and llvmlite (which numba brings); nothing from cpuq.

Numba's on-disk cache does not see across files (kquants.py and legacy.py inline these
functions into their own cached kernels); cpuq/__init__.py therefore keys its cache
directory by a hash of every quants/ and kernels/ source, so an edit here starts afresh.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

f32 = np.float32

# ggml's GROUP_MAX_EPS: below this max |x| a group counts as all zero
GROUP_MAX_EPS = f32(1e-15)

# Division by zero must give inf/nan as in C, not raise, and nothing may be reassociated.
_JIT = dict(cache=True, fastmath=False, error_model="numpy")


# ---------------------------------------------------------------------------------------------
# Bit-level float helpers. Numba cannot reinterpret a float's bits, so the intrinsics below
# emit the LLVM bitcast directly; it costs nothing and vectorizes.

@intrinsic
def f32_bits(typingctx, value):
    """int32 holding the IEEE bits of float32 `value`."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@intrinsic
def f32_from_bits(typingctx, bits):
    """float32 whose IEEE bits are the low 32 bits of integer `bits`."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        value = args[0]
        width = value.type.width
        if width > 32:
            value = builder.trunc(value, ir.IntType(32))
        elif width < 32:
            value = builder.zext(value, ir.IntType(32))
        return builder.bitcast(value, ir.FloatType())

    return types.float32(bits), codegen


@njit(**_JIT)
def nearest_int(v):
    """ggml's nearest_int(float): adding 1.5 * 2**23 leaves round-half-to-even(v) in the low
    mantissa bits. Done on the bits, as ggml does, so that even values outside its
    |v| <= 2**22 contract give ggml's answer."""
    return (np.int64(f32_bits(v + f32(12582912.0))) & 0x7FFFFF) - 0x400000


def _as_i32(builder, value):
    width = value.type.width
    if width > 32:
        return builder.trunc(value, ir.IntType(32))
    return builder.sext(value, ir.IntType(32)) if width < 32 else value


@intrinsic
def level(typingctx, v, lo, hi):
    """float32(MAX(lo, MIN(hi, nearest_int(v)))) for float32 v and integer bounds lo <= hi:
    the clamped quantization level of the search loops. The same bit trick as nearest_int,
    written in 32-bit integer IR so a vectorized loop keeps 16 lanes per AVX-512 register
    (numba would widen every integer step to int64)."""
    if v != types.float32 or not isinstance(lo, types.Integer) or not isinstance(hi, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        value, low, high = args
        i32 = ir.IntType(32)
        low, high = _as_i32(builder, low), _as_i32(builder, high)
        shifted = builder.fadd(value, ir.Constant(ir.FloatType(), 12582912.0))
        q = builder.sub(builder.and_(builder.bitcast(shifted, i32), ir.Constant(i32, 0x7FFFFF)),
                        ir.Constant(i32, 0x400000))
        q = builder.select(builder.icmp_signed("<", q, high), q, high)
        q = builder.select(builder.icmp_signed(">", q, low), q, low)
        return builder.sitofp(q, ir.FloatType())

    return types.float32(v, lo, hi), codegen


@njit(**_JIT)
def round_half_away(v):
    """C roundf for float32 v with |v| < 2**31: halves go away from zero (np.round does not)."""
    t = f32(np.int64(v))  # truncation toward zero; exact, as is v - t below
    frac = v - t
    if frac >= f32(0.5):
        t += f32(1.0)
    elif frac <= f32(-0.5):
        t -= f32(1.0)
    return t


@njit(**_JIT)
def fp32_to_fp16_bits(v):
    """IEEE half bits (0..65535) nearest to float32 v, ties to even, with subnormals,
    overflow to inf, and every NaN as 0x7E00, as GGML_FP32_TO_FP16 gives."""
    bits = np.int64(f32_bits(v))
    sign = (bits >> 16) & 0x8000
    mag = bits & 0x7FFFFFFF
    if mag > 0x7F800000:
        return sign | 0x7E00
    if mag >= 0x477FF000:  # >= 65520: rounds past the largest half, 65504
        return sign | 0x7C00
    if mag >= 0x38800000:  # >= 2**-14: a normal half
        rebased = mag - 0x38000000  # exponent bias 127 -> 15, still 23 mantissa bits
        half = rebased >> 13
        rest = rebased & 0x1FFF
        if rest > 0x1000 or (rest == 0x1000 and (half & 1) == 1):
            half += 1  # a carry into the exponent is the right answer
        return sign | half
    if mag <= 0x33000000:  # <= 2**-25: half of the smallest subnormal ties to zero
        return sign
    # subnormal half: mantissa (with its implicit bit) scaled to units of 2**-24
    exponent = mag >> 23
    mantissa = (mag & 0x7FFFFF) | 0x800000
    shift = 126 - exponent  # 14..24
    half = mantissa >> shift
    rest = mantissa & ((1 << shift) - 1)
    halfway = 1 << (shift - 1)
    if rest > halfway or (rest == halfway and (half & 1) == 1):
        half += 1
    return sign | half


@njit(**_JIT)
def fp16_bits_to_fp32(h):
    """The float32 equal to the IEEE half with bits h (0..65535); exact."""
    h = np.int64(h)
    sign = (h & 0x8000) << 16
    exponent = (h >> 10) & 0x1F
    mantissa = h & 0x3FF
    if exponent == 0:
        magnitude = f32(mantissa) * f32(5.9604644775390625e-08)  # m * 2**-24, exact
        return -magnitude if sign else magnitude
    if exponent == 0x1F:
        return f32_from_bits(sign | 0x7F800000 | (mantissa << 13))
    return f32_from_bits(sign | ((exponent + 112) << 23) | (mantissa << 13))


# ---------------------------------------------------------------------------------------------
# Group searches (lanes: column g of x is one group)

@njit(inline="always", **_JIT)
def _qx_trial_sums(x, w, iscale, nmax, sumlx, suml2):
    """For one trial scale per group: sum(w*x*q) and sum(w*q*q), q = levels of x at iscale,
    accumulated element by element in llama.cpp's order (into zeroed sumlx, suml2)."""
    n, groups = x.shape
    for g in range(groups):
        sumlx[g] = np.float32(0.0)
        suml2[g] = np.float32(0.0)
    for i in range(n):
        for g in range(groups):
            q = level(iscale[g] * x[i, g], -nmax, nmax - 1)
            wi = w[i, g]
            sumlx[g] += wi * x[i, g] * q
            suml2[g] += wi * q * q


@njit(**_JIT)
def make_qx_quants(x, w, nmax, L, scales):
    """llama.cpp's make_qx_quants(n, nmax, x, L, rmse_type=1, qw) for every group at once.

    x, w: (n, groups) f32, w the per-value weights (pass x*x where llama.cpp passes qw=NULL);
    -> L: (n, groups) uint8 levels in [0, 2*nmax), scales: (groups,) f32 (x ~ scale * (L - nmax)).
    """
    n, groups = x.shape
    zero = f32(0.0)
    nmax_f = f32(nmax)
    amax = np.zeros(groups, np.float32)
    peak = np.zeros(groups, np.float32)  # the signed value of the first largest |x|
    iscale = np.empty(groups, np.float32)
    best_iscale = np.empty(groups, np.float32)
    best = np.empty(groups, np.float32)
    sumlx = np.zeros(groups, np.float32)
    suml2 = np.zeros(groups, np.float32)

    for i in range(n):
        for g in range(groups):
            v = x[i, g]
            a = abs(v)
            bigger = a > amax[g]
            amax[g] = a if bigger else amax[g]
            peak[g] = v if bigger else peak[g]

    for g in range(groups):
        iscale[g] = -nmax_f / peak[g]
    _qx_trial_sums(x, w, iscale, nmax, sumlx, suml2)
    for g in range(groups):
        s = sumlx[g] / suml2[g] if suml2[g] != zero else zero
        scales[g] = s
        best[g] = s * sumlx[g]
        best_iscale[g] = iscale[g]

    for step in range(-9, 10):
        if step == 0:
            continue
        numerator = -(nmax_f + f32(0.1) * f32(step))
        for g in range(groups):
            iscale[g] = numerator / peak[g]
        _qx_trial_sums(x, w, iscale, nmax, sumlx, suml2)
        for g in range(groups):
            if suml2[g] > zero and sumlx[g] * sumlx[g] > best[g] * suml2[g]:
                s = sumlx[g] / suml2[g]
                scales[g] = s
                best[g] = s * sumlx[g]
                best_iscale[g] = iscale[g]

    # llama.cpp rewrites L whenever it takes a trial scale; the levels of the last one taken
    # are a function of that scale alone, so one pass at the end gives the same L.
    for i in range(n):
        for g in range(groups):
            q = nmax + max(-nmax, min(nmax - 1, nearest_int(best_iscale[g] * x[i, g])))
            L[i, g] = q if amax[g] >= GROUP_MAX_EPS else 0
    for g in range(groups):
        if not amax[g] >= GROUP_MAX_EPS:
            scales[g] = zero


@njit(**_JIT)
def make_qkx_quants(x, w, nmax, rmin, rdelta, nstep, L, scales, mins):
    """llama.cpp's make_qkx2_quants / make_qkx3_quants (with weights, use_mad=false: the two
    are the same arithmetic) for every group at once.

    x, w: (n, groups) f32; trial scales (rmin + rdelta*is + nmax) / (max - min), is = 0..nstep
    -> L: (n, groups) uint8 levels in [0, nmax], scales, mins: (groups,) f32 with
    x ~ scale * L - min (mins is llama.cpp's `the_min`, >= 0).
    """
    n, groups = x.shape
    zero = f32(0.0)
    nmax_f = f32(nmax)
    lo = np.empty(groups, np.float32)  # llama.cpp's `min`, updated as better fits are taken
    hi = np.empty(groups, np.float32)
    sum_w = np.empty(groups, np.float32)
    sum_x = np.empty(groups, np.float32)
    iscale = np.empty(groups, np.float32)
    best_iscale = np.empty(groups, np.float32)
    best_lo = np.empty(groups, np.float32)  # the `min` that the levels of best_iscale used
    best_err = np.zeros(groups, np.float32)
    sum_l = np.empty(groups, np.float32)
    sum_l2 = np.empty(groups, np.float32)
    sum_xl = np.empty(groups, np.float32)
    trial_scale = np.empty(groups, np.float32)
    trial_min = np.empty(groups, np.float32)
    trial_ok = np.empty(groups, np.bool_)
    flat = np.empty(groups, np.bool_)
    err = np.empty(groups, np.float32)
    levels = np.empty((n, groups), np.float32)  # llama.cpp's Laux, kept as floats

    for g in range(groups):
        v = x[0, g]
        lo[g] = v
        hi[g] = v
        sum_w[g] = w[0, g]
        sum_x[g] = w[0, g] * v
    for i in range(1, n):
        for g in range(groups):
            v = x[i, g]
            lo[g] = v if v < lo[g] else lo[g]
            hi[g] = v if v > hi[g] else hi[g]
            sum_w[g] += w[i, g]
            sum_x[g] += w[i, g] * v
    for g in range(groups):
        if lo[g] > zero:
            lo[g] = zero
        # a flat group (hi == lo) gives inf here; it never takes a trial and its lane is
        # overwritten at the end
        flat[g] = hi[g] == lo[g]
        iscale[g] = nmax_f / (hi[g] - lo[g])
        trial_scale[g] = f32(1.0) / iscale[g]
        best_iscale[g] = iscale[g]
        best_lo[g] = lo[g]
    for i in range(n):
        for g in range(groups):
            q = level(iscale[g] * (x[i, g] - lo[g]), 0, nmax)
            diff = trial_scale[g] * q + lo[g] - x[i, g]
            best_err[g] += w[i, g] * (diff * diff)
    for g in range(groups):
        scales[g] = trial_scale[g]

    if nstep >= 1:
        for step in range(nstep + 1):
            numerator = rmin + rdelta * f32(step) + nmax_f
            for g in range(groups):
                iscale[g] = numerator / (hi[g] - lo[g])
                sum_l[g] = zero
                sum_l2[g] = zero
                sum_xl[g] = zero
            for i in range(n):
                for g in range(groups):
                    q = level(iscale[g] * (x[i, g] - lo[g]), 0, nmax)
                    levels[i, g] = q
                    wq = w[i, g] * q
                    sum_l[g] += wq
                    sum_l2[g] += wq * q
                    sum_xl[g] += wq * x[i, g]
            for g in range(groups):
                D = sum_w[g] * sum_l2[g] - sum_l[g] * sum_l[g]
                s = (sum_w[g] * sum_xl[g] - sum_x[g] * sum_l[g]) / D
                m = (sum_l2[g] * sum_x[g] - sum_l[g] * sum_xl[g]) / D
                if m > zero:
                    m = zero
                    s = sum_xl[g] / sum_l2[g]
                trial_ok[g] = D > zero and not flat[g]
                trial_scale[g] = s
                trial_min[g] = m
                err[g] = zero
            for i in range(n):
                for g in range(groups):
                    diff = trial_scale[g] * levels[i, g] + trial_min[g] - x[i, g]
                    err[g] += w[i, g] * (diff * diff)
            for g in range(groups):
                if trial_ok[g] and err[g] < best_err[g]:
                    best_err[g] = err[g]
                    best_iscale[g] = iscale[g]
                    best_lo[g] = lo[g]
                    scales[g] = trial_scale[g]
                    lo[g] = trial_min[g]

    # The levels of the last trial taken depend only on its iscale and the `min` it used.
    for i in range(n):
        for g in range(groups):
            q = max(0, min(nmax, nearest_int(best_iscale[g] * (x[i, g] - best_lo[g]))))
            L[i, g] = 0 if flat[g] else q
    for g in range(groups):
        mins[g] = -lo[g]
        if flat[g]:
            scales[g] = zero


# ---------------------------------------------------------------------------------------------
# One small group

@njit(**_JIT)
def make_qp_quants(x, w, nmax, L):
    """llama.cpp's make_qp_quants(n, nmax, x, L, quant_weights) for one group.

    x, w: (n,) f32 (the sub-block scales or mins of a super-block, and their weights)
    -> L: (n,) uint8 levels (<= nmax; stored as uint8 exactly as C does); returns the scale.
    """
    n = x.shape[0]
    zero = f32(0.0)
    nmax_f = f32(nmax)
    peak = zero
    for i in range(n):
        peak = peak if peak > x[i] else x[i]
    if peak < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return zero
    iscale = nmax_f / peak
    for i in range(n):
        L[i] = nearest_int(iscale * x[i]) & 0xFF
    scale = f32(1.0) / iscale
    best_mse = zero
    for i in range(n):
        diff = x[i] - scale * f32(L[i])
        best_mse += w[i] * diff * diff
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_step = (f32(0.1) * f32(step) + nmax_f) / peak
        scale_step = f32(1.0) / iscale_step
        mse = zero
        for i in range(n):
            q = min(nmax, nearest_int(iscale_step * x[i]))
            diff = x[i] - scale_step * f32(q)
            mse += w[i] * diff * diff
        if mse < best_mse:
            best_mse = mse
            iscale = iscale_step
    sumlx = zero
    suml2 = zero
    for i in range(n):
        q = min(nmax, nearest_int(iscale * x[i]))
        L[i] = q & 0xFF
        sumlx += w[i] * x[i] * f32(q)
        suml2 += w[i] * f32(q) * f32(q)
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            wi = w[i]
            li = f32(L[i])
            slx = sumlx - wi * x[i] * li
            sl2 = suml2 - wi * li * li
            if slx > zero and sl2 > zero:
                new_l = min(nmax, nearest_int(x[i] * sl2 / slx))
                if new_l != np.int64(L[i]):
                    slx += wi * x[i] * f32(new_l)
                    sl2 += wi * f32(new_l) * f32(new_l)
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l & 0xFF
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    return sumlx / suml2 if suml2 > zero else zero
