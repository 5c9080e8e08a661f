"""CUDA C source of the GPU kernels (compiled by CuPy's NVRTC in runtime/gpu.py), and the
table of which GGML types they read.

Every quantized type is one struct with its block size QK, its block's bytes BYTES and a
`part(block, p, v)` that writes values 32p .. 32p+31 of the block to v[32], with the same
float32 operations, in the same order, as cpuq.quants.decode (so the GPU's dequantized
weights equal the CPU's bit for bit). The kernels are templates over those structs:
  matvec<T, ADD>      y[t, r] (+)= W[r] . x[t]   one warp per row, f32 accumulation (decode,
                                                  and prompts of a few tokens)
  moe_matvec<T>       the same for each selected expert of a stack, the ids read from device
                      memory (a mixture of experts' one-token step)
  dequant<T, O>       W -> O (float or __half) rows (prompts: then cuBLAS)
and the small ops: rms_norm, qkv_post (biases, Qwen3's q/k norm, RoPE from tables, the KV
cache store), attention (causal, grouped-query, online softmax), swiglu, add_to, and a mixture
of experts' router (moe_route: softmax, top-k, weights), moe_weighted_sum and moe_add_gated
(qwen2moe's shared expert), with kernels/moe.py's semantics.

Positions come from a device int (`n_past`), not from launch arguments, so one recorded
CUDA graph replays every decode step. Every index is bounded by the sizes passed in, which
runtime/gpu.py takes from the validated tensors.

Imports only cpuq.quants.types: this module holds text and a table.
"""
from __future__ import annotations

from ..quants.types import BF16, F16, F32, GGML_TYPES, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0

# GGML type id -> the struct that decodes it, "T" + the type's name.
TYPE_STRUCTS = {t: "T" + GGML_TYPES[t].name for t in (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K)}
# Values per block of each struct (its QK): the type's block size, or 32 for the float
# types (block size 1), which are read 32 values at a time.
TYPE_QK = {t: GGML_TYPES[t].block_size if GGML_TYPES[t].block_size > 1 else 32 for t in TYPE_STRUCTS}

MATVEC_WARPS = 4      # rows per matvec block (one warp each)
ATTENTION_WARPS = 8   # warps sharing one query's keys
ATTENTION_CHUNK = 256  # keys per split of a one-token step's attention
MOE_MAX_EXPERTS = 512  # experts a router may have (moe_route's shared arrays)

SOURCE = r"""
#include <cuda_fp16.h>
#define CUDART_INF_F __int_as_float(0x7f800000)
#define MOE_MAX_EXPERTS """ + str(MOE_MAX_EXPERTS) + r"""
typedef unsigned char u8;

__device__ __forceinline__ float half_at(const u8* p) {
    return __half2float(__ushort_as_half((unsigned short)(p[0] | (p[1] << 8))));
}
__device__ __forceinline__ unsigned u32_at(const u8* p) {
    return (unsigned)p[0] | ((unsigned)p[1] << 8) | ((unsigned)p[2] << 16) | ((unsigned)p[3] << 24);
}
// d * q + m and d * q - m without contraction to a fused multiply-add, as the CPU decoders.
__device__ __forceinline__ float mul_add(float d, float q, float m) { return __fadd_rn(__fmul_rn(d, q), m); }
__device__ __forceinline__ float mul_sub(float d, float q, float m) { return __fsub_rn(__fmul_rn(d, q), m); }

struct TF32 { enum { QK = 32, BYTES = 128 };
    __device__ static void part(const u8* b, int, float* v) {
        #pragma unroll
        for (int j = 0; j < 32; j++) v[j] = __uint_as_float(u32_at(b + 4 * j)); } };
struct TF16 { enum { QK = 32, BYTES = 64 };
    __device__ static void part(const u8* b, int, float* v) {
        #pragma unroll
        for (int j = 0; j < 32; j++) v[j] = half_at(b + 2 * j); } };
struct TBF16 { enum { QK = 32, BYTES = 64 };
    __device__ static void part(const u8* b, int, float* v) {
        #pragma unroll
        for (int j = 0; j < 32; j++) v[j] = __uint_as_float(((unsigned)b[2 * j] << 16) | ((unsigned)b[2 * j + 1] << 24)); } };
struct TQ8_0 { enum { QK = 32, BYTES = 34 };
    __device__ static void part(const u8* b, int, float* v) {
        float d = half_at(b);
        #pragma unroll
        for (int j = 0; j < 32; j++) v[j] = __fmul_rn((float)(signed char)b[2 + j], d); } };
struct TQ4_0 { enum { QK = 32, BYTES = 18 };
    __device__ static void part(const u8* b, int, float* v) {
        float d = half_at(b);
        #pragma unroll
        for (int j = 0; j < 16; j++) {
            int q = b[2 + j];
            v[j] = __fmul_rn(d, (float)((q & 15) - 8));
            v[j + 16] = __fmul_rn(d, (float)((q >> 4) - 8)); } } };
struct TQ4_1 { enum { QK = 32, BYTES = 20 };
    __device__ static void part(const u8* b, int, float* v) {
        float d = half_at(b), m = half_at(b + 2);
        #pragma unroll
        for (int j = 0; j < 16; j++) {
            int q = b[4 + j];
            v[j] = mul_add(d, (float)(q & 15), m);
            v[j + 16] = mul_add(d, (float)(q >> 4), m); } } };
struct TQ5_0 { enum { QK = 32, BYTES = 22 };
    __device__ static void part(const u8* b, int, float* v) {
        float d = half_at(b);
        unsigned qh = u32_at(b + 2);
        #pragma unroll
        for (int j = 0; j < 16; j++) {
            int q = b[6 + j];
            int lo = (q & 15) | (((qh >> j) & 1) << 4), hi = (q >> 4) | (((qh >> (j + 16)) & 1) << 4);
            v[j] = __fmul_rn(d, (float)(lo - 16));
            v[j + 16] = __fmul_rn(d, (float)(hi - 16)); } } };
struct TQ5_1 { enum { QK = 32, BYTES = 24 };
    __device__ static void part(const u8* b, int, float* v) {
        float d = half_at(b), m = half_at(b + 2);
        unsigned qh = u32_at(b + 4);
        #pragma unroll
        for (int j = 0; j < 16; j++) {
            int q = b[8 + j];
            int lo = (q & 15) | (((qh >> j) & 1) << 4), hi = (q >> 4) | (((qh >> (j + 16)) & 1) << 4);
            v[j] = mul_add(d, (float)lo, m);
            v[j + 16] = mul_add(d, (float)hi, m); } } };
// 6-bit scale and min of sub-block j from the 12 packed bytes s (see quants/decode.py).
__device__ __forceinline__ void k_scale_min(const u8* s, int j, int& sc, int& mn) {
    if (j < 4) { sc = s[j] & 63; mn = s[j + 4] & 63; }
    else { sc = (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4); mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4); }
}
struct TQ4_K { enum { QK = 256, BYTES = 144 };
    __device__ static void part(const u8* b, int p, float* v) {
        int sc, mn; k_scale_min(b + 4, p, sc, mn);
        float ds = __fmul_rn(half_at(b), (float)sc), ms = __fmul_rn(half_at(b + 2), (float)mn);
        const u8* q = b + 16 + (p >> 1) * 32; int shift = (p & 1) * 4;
        #pragma unroll
        for (int l = 0; l < 32; l++) v[l] = mul_sub(ds, (float)((q[l] >> shift) & 15), ms); } };
struct TQ5_K { enum { QK = 256, BYTES = 176 };
    __device__ static void part(const u8* b, int p, float* v) {
        int sc, mn; k_scale_min(b + 4, p, sc, mn);
        float ds = __fmul_rn(half_at(b), (float)sc), ms = __fmul_rn(half_at(b + 2), (float)mn);
        const u8* qh = b + 16; const u8* q = b + 48 + (p >> 1) * 32; int shift = (p & 1) * 4;
        #pragma unroll
        for (int l = 0; l < 32; l++)
            v[l] = mul_sub(ds, (float)(((q[l] >> shift) & 15) | (((qh[l] >> p) & 1) << 4)), ms); } };
struct TQ6_K { enum { QK = 256, BYTES = 210 };
    __device__ static void part(const u8* b, int p, float* v) {
        float d = half_at(b + 208);
        int half = p >> 2, quarter = p & 3;
        const u8* lo = b + half * 64 + (quarter & 1) * 32; const u8* hi = b + 128 + half * 32;
        int lo_shift = (quarter >> 1) * 4, hi_shift = quarter * 2;
        #pragma unroll
        for (int g = 0; g < 2; g++) {
            float dg = __fmul_rn(d, (float)(signed char)b[192 + half * 8 + quarter * 2 + g]);
            #pragma unroll
            for (int i = 0; i < 16; i++) {
                int l = g * 16 + i;
                int q = ((lo[l] >> lo_shift) & 15) | (((hi[l] >> hi_shift) & 3) << 4);
                v[l] = __fmul_rn(dg, (float)(q - 32)); } } } };

__device__ __forceinline__ float warp_max(float s) {
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) s = fmaxf(s, __shfl_xor_sync(0xffffffffu, s, o));
    return s;
}
__device__ __forceinline__ float warp_sum(float s) {
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    return s;
}

// Row wr (cols/QK blocks) . xr, summed over the warp: lane i takes parts i, i + 32, ...
template <class T>
__device__ __forceinline__ float row_dot(const u8* __restrict__ wr, int cols, const float* __restrict__ xr, int lane) {
    const int parts = cols / 32, per_block = T::QK / 32;
    float acc = 0.f;
    for (int p = lane; p < parts; p += 32) {
        float v[32];
        T::part(wr + (size_t)(p / per_block) * T::BYTES, p % per_block, v);
        const float4* xp = reinterpret_cast<const float4*>(xr + p * 32);
        #pragma unroll
        for (int i = 0; i < 8; i++) {
            float4 xv = xp[i];
            acc += v[4 * i] * xv.x + v[4 * i + 1] * xv.y + v[4 * i + 2] * xv.z + v[4 * i + 3] * xv.w;
        }
    }
    return warp_sum(acc);
}

// w: (rows, cols/QK*BYTES) blocks; x: (n, x_stride) f32; y: (n, y_stride) f32.
// grid (ceil(rows / warps), n), block 32 * warps: warp -> row, its lanes over the row's 32-value parts.
template <class T, bool ADD>
__global__ void matvec(const u8* __restrict__ w, int rows, int cols, const float* __restrict__ x, int x_stride,
                       float* __restrict__ y, int y_stride) {
    int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31, t = blockIdx.y;
    if (row >= rows) return;
    float acc = row_dot<T>(w + (size_t)row * (size_t)(cols / T::QK) * T::BYTES, cols, x + (size_t)t * x_stride, lane);
    if (lane == 0) {
        float* out = y + (size_t)t * y_stride + row;
        *out = ADD ? *out + acc : acc;
    }
}

// The selected experts' products, the expert ids read from device memory (a recorded step
// replays them): slot s (blockIdx.y, of n tokens * k selected) is expert ids[s] of the stack
// w (n_expert * rows rows of cols/QK*BYTES bytes), times x row s / x_div (x_div = k: the
// token's input, for gate and up; 1: the slot's own, for down); y: (n*k, y_stride) f32.
template <class T>
__global__ void moe_matvec(const u8* __restrict__ w, int rows, int cols, int n_expert, const int* __restrict__ ids,
                           const float* __restrict__ x, int x_div, int x_stride, float* __restrict__ y, int y_stride) {
    int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31, s = blockIdx.y;
    int e = ids[s];
    if (row >= rows || e < 0 || e >= n_expert) return;
    const u8* wr = w + ((size_t)e * rows + row) * (size_t)(cols / T::QK) * T::BYTES;
    float acc = row_dot<T>(wr, cols, x + (size_t)(s / x_div) * x_stride, lane);
    if (lane == 0) y[(size_t)s * y_stride + row] = acc;
}

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ float load(const float* p) { return *p; }
__device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
// Eight values at p (16-byte aligned for halves, 32 for floats) in one or two vector loads.
__device__ __forceinline__ void load8(const __half* p, float* f) {
    uint4 u = *reinterpret_cast<const uint4*>(p);
    const __half2* h = reinterpret_cast<const __half2*>(&u);
    #pragma unroll
    for (int i = 0; i < 4; i++) { float2 v = __half22float2(h[i]); f[2 * i] = v.x; f[2 * i + 1] = v.y; }
}
__device__ __forceinline__ void load8(const float* p, float* f) {
    float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
    f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w; f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
}

// w: (rows, cols/QK*BYTES) -> out: (rows, cols) of O; one thread per 32 values.
template <class T, class O>
__global__ void dequant(const u8* __restrict__ w, long long rows, int cols, O* __restrict__ out) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const int parts = cols / 32, per_block = T::QK / 32;
    if (i >= rows * parts) return;
    long long row = i / parts; int p = (int)(i % parts);
    float v[32];
    T::part(w + row * (long long)(cols / T::QK) * T::BYTES + (long long)(p / per_block) * T::BYTES, p % per_block, v);
    O* o = out + row * cols + p * 32;
    #pragma unroll
    for (int j = 0; j < 32; j++) store(o + j, v[j]);
}

// Sum over the block (blockDim.x a multiple of 32, <= 1024), returned to every thread.
__device__ float block_sum(float s, float* scratch) {
    s = warp_sum(s);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, n_warps = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) scratch[warp] = s;
    __syncthreads();
    s = lane < n_warps ? scratch[lane] : 0.f;
    return warp_sum(s);
}

// x: (n, d) -> out: (n, d) = x / sqrt(mean(x^2) + eps) * weight; grid n rows.
extern "C" __global__ void rms_norm(const float* __restrict__ x, const float* __restrict__ weight, float eps, int d,
                                    float* __restrict__ out) {
    __shared__ float scratch[32];
    const float* xr = x + (size_t)blockIdx.x * d;
    float* o = out + (size_t)blockIdx.x * d;
    float s = 0.f;
    for (int j = threadIdx.x; j < d; j += blockDim.x) s += xr[j] * xr[j];
    float scale = rsqrtf(block_sum(s, scratch) / d + eps);
    for (int j = threadIdx.x; j < d; j += blockDim.x) o[j] = xr[j] * scale * weight[j];
}

// Per token t (blockIdx.y) and head (blockIdx.x: query heads, then kv heads): add the bias,
// RMS-normalize the head (Qwen3; norm may be null), rotate by RoPE at position n_past[0] + t
// (cos/sin: (n_ctx, n_rot/2) tables; neox pairs i with i + n_rot/2, else 2i with 2i+1); queries in
// place, keys and values (unrotated, biased) into the cache at (kv head, position).
// q: (n, n_head*hd), k, v: (n, n_kv*hd); caches: (n_kv, n_ctx, hd); hd <= 512;
// block: hd threads rounded up to a multiple of 32 (the rest only join the sums).
template <class KV>
__global__ void qkv_post(float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                         const float* __restrict__ bq, const float* __restrict__ bk, const float* __restrict__ bv,
                         const float* __restrict__ q_norm, const float* __restrict__ k_norm, float eps,
                         const float* __restrict__ cos_t, const float* __restrict__ sin_t, int n_rot, int neox,
                         const int* __restrict__ n_past, int n_head, int n_kv, int hd, int n_ctx,
                         KV* __restrict__ k_cache, KV* __restrict__ v_cache) {
    __shared__ float scratch[32];
    __shared__ float row[512];
    int h = blockIdx.x, t = blockIdx.y, i = threadIdx.x;
    bool live = i < hd;
    int pos = n_past[0] + t;
    if (pos >= n_ctx) return;  // the caller checks the chunk fits; never write past the cache
    bool is_q = h < n_head;
    int hk = is_q ? 0 : h - n_head;
    const float* src = is_q ? q + ((size_t)t * n_head + h) * hd : k + ((size_t)t * n_kv + hk) * hd;
    const float* bias = is_q ? bq : bk;
    const float* norm = is_q ? q_norm : k_norm;
    float val = live ? src[i] + (bias ? bias[(is_q ? h : hk) * hd + i] : 0.f) : 0.f;
    if (norm) {
        float scale = rsqrtf(block_sum(val * val, scratch) / hd + eps);
        val = live ? val * scale * norm[i] : 0.f;
    }
    if (live) row[i] = val;
    __syncthreads();
    if (!live) return;
    int half = n_rot / 2;
    if (i < 2 * half) {
        const float* c = cos_t + (size_t)pos * half;
        const float* s = sin_t + (size_t)pos * half;
        if (neox) {
            int j = i < half ? i : i - half;
            float a = row[j], b = row[j + half];
            val = i < half ? a * c[j] - b * s[j] : a * s[j] + b * c[j];
        } else {
            int j = i >> 1;
            float a = row[2 * j], b = row[2 * j + 1];
            val = (i & 1) ? a * s[j] + b * c[j] : a * c[j] - b * s[j];
        }
    }
    if (is_q) {
        q[((size_t)t * n_head + h) * hd + i] = val;
    } else {
        size_t at = ((size_t)hk * n_ctx + pos) * hd + i;
        store(k_cache + at, val);
        float vv = v[((size_t)t * n_kv + hk) * hd + i] + (bv ? bv[hk * hd + i] : 0.f);
        store(v_cache + at, vv);
    }
}

// Causal attention of query token t (blockIdx.y) head h (blockIdx.x) over cache positions
// 0 .. n_past[0] + t, or over split blockIdx.z's `chunk` of them: each warp takes every WARPS-th tile
// of 32 keys with an online softmax, then the warps combine. One split: out = the result. Several
// (one-token steps, where n_head blocks alone leave most of the GPU idle): part[t, h, split] = (max
// score, sum of exp, hd unnormalized sums) for attention_combine. q, out: (n, n_head*hd);
// caches (n_kv, n_ctx, hd); hd <= 256.
template <class KV, int WARPS>
__global__ void attention(const float* __restrict__ q, const KV* __restrict__ k_cache, const KV* __restrict__ v_cache,
                          const int* __restrict__ n_past, int n_head, int n_kv, int hd, int n_ctx, float scale,
                          int chunk, float* __restrict__ out, float* __restrict__ part) {
    __shared__ float qs[256];
    __shared__ float part_m[WARPS], part_l[WARPS];
    __shared__ float part_acc[WARPS][256];
    int h = blockIdx.x, t = blockIdx.y, split = blockIdx.z, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int hk = h / (n_head / n_kv);
    int n_keys = min(n_past[0] + t + 1, n_ctx);
    int lo = split * chunk, hi = min(lo + chunk, n_keys);
    const float* qr = q + ((size_t)t * n_head + h) * hd;
    for (int j = threadIdx.x; j < hd; j += blockDim.x) qs[j] = qr[j] * scale;
    __syncthreads();
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    float m = -CUDART_INF_F, l = 0.f;
    const KV* kb = k_cache + (size_t)hk * n_ctx * hd;
    const KV* vb = v_cache + (size_t)hk * n_ctx * hd;
    // Lane i scores key tile + i over all of hd (independent loads: a tile costs a few memory
    // round trips, not one per key), then the lanes sum the tile's values for their dimensions.
    for (int tile = lo + warp * 32; tile < hi; tile += WARPS * 32) {
        int j = tile + lane;
        float s = -CUDART_INF_F;
        if (j < hi) {
            const KV* kr = kb + (size_t)j * hd;
            float dot = 0.f;
            if ((hd & 7) == 0) {  // rows then start on 16 (halves) or 32 (floats) bytes
                for (int d = 0; d < hd; d += 8) {
                    float f[8];
                    load8(kr + d, f);
                    #pragma unroll
                    for (int i = 0; i < 8; i++) dot += qs[d + i] * f[i];
                }
            } else {
                for (int d = 0; d < hd; d++) dot += qs[d] * load(kr + d);
            }
            s = dot;
        }
        float m_new = fmaxf(m, warp_max(s));
        float corr = __expf(m - m_new), p = __expf(s - m_new);
        l = l * corr + warp_sum(p);
        #pragma unroll
        for (int r = 0; r < 8; r++) acc[r] *= corr;
        int n_tile = min(32, hi - tile);
        #pragma unroll 8
        for (int kk = 0; kk < n_tile; kk++) {
            float pk = __shfl_sync(0xffffffffu, p, kk);
            const KV* vr = vb + (size_t)(tile + kk) * hd;
            #pragma unroll
            for (int r = 0; r < 8; r++) if (lane + 32 * r < hd) acc[r] += pk * load(vr + lane + 32 * r);
        }
        m = m_new;
    }
    if (lane == 0) { part_m[warp] = m; part_l[warp] = l; }
    #pragma unroll
    for (int r = 0; r < 8; r++) if (lane + 32 * r < hd) part_acc[warp][lane + 32 * r] = acc[r];
    __syncthreads();
    float big = -CUDART_INF_F;
    for (int w = 0; w < WARPS; w++) big = fmaxf(big, part_m[w]);
    float total = 0.f;
    for (int w = 0; w < WARPS; w++) if (part_l[w] > 0.f) total += part_l[w] * __expf(part_m[w] - big);
    float* dst = gridDim.z == 1 ? out + ((size_t)t * n_head + h) * hd
                                : part + (((size_t)t * n_head + h) * gridDim.z + split) * (hd + 2);
    for (int j = threadIdx.x; j < hd; j += blockDim.x) {
        float o = 0.f;
        for (int w = 0; w < WARPS; w++) if (part_l[w] > 0.f) o += part_acc[w][j] * __expf(part_m[w] - big);
        if (gridDim.z == 1) dst[j] = o / total; else dst[2 + j] = o;
    }
    if (gridDim.z > 1 && threadIdx.x == 0) { dst[0] = big; dst[1] = total; }
}

// out[t, h] from attention's n_split parts (grid (n_head, n), block >= hd threads).
extern "C" __global__ void attention_combine(const float* __restrict__ part, int n_split, int n_head, int hd,
                                             float* __restrict__ out) {
    int h = blockIdx.x, t = blockIdx.y, j = threadIdx.x;
    if (j >= hd) return;
    const float* p = part + ((size_t)t * n_head + h) * n_split * (hd + 2);
    float big = -CUDART_INF_F;
    for (int s = 0; s < n_split; s++) if (p[s * (hd + 2) + 1] > 0.f) big = fmaxf(big, p[s * (hd + 2)]);
    float total = 0.f, o = 0.f;
    for (int s = 0; s < n_split; s++) {
        const float* ps = p + s * (hd + 2);
        if (ps[1] > 0.f) { float w = __expf(ps[0] - big); total += ps[1] * w; o += ps[2 + j] * w; }
    }
    out[((size_t)t * n_head + h) * hd + j] = o / total;
}

// gate = silu(gate) * up over n values.
extern "C" __global__ void swiglu(float* __restrict__ gate, const float* __restrict__ up, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) { float g = gate[i]; gate[i] = g / (1.f + __expf(-g)) * up[i]; }
}

// x += y over n values (the residual stream plus a computed stage output).
extern "C" __global__ void add_to(float* __restrict__ x, const float* __restrict__ y, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += y[i];
}

// The router of token t (blockIdx.x), as kernels/moe.py route: p = softmax(h[t] . w[e] for each
// expert e), its n_used most probable experts (most probable first, the lower index on a tie)
// -> ids (n, n_used) and weights (n, n_used) = their p, divided by their sum (clamped below at
// F16's smallest normal, as llama.cpp) if norm. h: (n, d), w: (n_expert, d) f32,
// n_expert <= MOE_MAX_EXPERTS; block: a multiple of 32 threads, warp -> expert.
extern "C" __global__ void moe_route(const float* __restrict__ h, const float* __restrict__ w, int n_expert, int d,
                                     int n_used, int norm, int* __restrict__ ids, float* __restrict__ weights) {
    __shared__ float p[MOE_MAX_EXPERTS];
    __shared__ unsigned char taken[MOE_MAX_EXPERTS];
    int t = blockIdx.x, warp = threadIdx.x >> 5, lane = threadIdx.x & 31, n_warps = blockDim.x >> 5;
    const float* hr = h + (size_t)t * d;
    for (int e = warp; e < n_expert; e += n_warps) {
        const float* wr = w + (size_t)e * d;
        float acc = 0.f;
        for (int j = lane; j < d; j += 32) acc += hr[j] * wr[j];
        acc = warp_sum(acc);
        if (lane == 0) { p[e] = acc; taken[e] = 0; }
    }
    __syncthreads();
    if (threadIdx.x != 0) return;
    // one thread, in kernels/moe.py's order: the softmax's sum and the top-k are sequential there
    float top = -CUDART_INF_F;
    for (int e = 0; e < n_expert; e++) top = fmaxf(top, p[e]);
    float total = 0.f;
    for (int e = 0; e < n_expert; e++) { p[e] = expf(p[e] - top); total += p[e]; }
    for (int e = 0; e < n_expert; e++) p[e] = p[e] / total;
    int* id = ids + (size_t)t * n_used;
    float* wt = weights + (size_t)t * n_used;
    float sum = 0.f;
    for (int q = 0; q < n_used; q++) {
        int best = -1;
        for (int e = 0; e < n_expert; e++)
            if (!taken[e] && (best < 0 || p[e] > p[best])) best = e;
        taken[best] = 1;
        id[q] = best;
        wt[q] = p[best];
        sum += p[best];
    }
    if (norm) {
        sum = fmaxf(sum, 6.103515625e-5f);
        for (int q = 0; q < n_used; q++) wt[q] = wt[q] / sum;
    }
}

// out[t, j] = sum over q of weights[t, q] * y[t * k + q, j], added in q's order (the most
// probable expert first, as llama.cpp and kernels/moe.py weighted_sum). y: (n*k, d), out: (n, d);
// grid (ceil(d / blockDim.x), n).
extern "C" __global__ void moe_weighted_sum(const float* __restrict__ y, const float* __restrict__ weights, int k,
                                            int d, float* __restrict__ out) {
    int j = blockIdx.x * blockDim.x + threadIdx.x, t = blockIdx.y;
    if (j >= d) return;
    float acc = 0.f;
    for (int q = 0; q < k; q++)
        acc = __fadd_rn(acc, __fmul_rn(weights[(size_t)t * k + q], y[((size_t)t * k + q) * d + j]));
    out[(size_t)t * d + j] = acc;
}

// qwen2moe's gated shared expert: out[t] += sigmoid(h[t] . g) * y[t]; out, y, h: (n, d), g: (d);
// grid n, block a multiple of 32 threads.
extern "C" __global__ void moe_add_gated(float* __restrict__ out, const float* __restrict__ y,
                                         const float* __restrict__ h, const float* __restrict__ g, int d) {
    __shared__ float scratch[32];
    size_t at = (size_t)blockIdx.x * d;
    float s = 0.f;
    for (int j = threadIdx.x; j < d; j += blockDim.x) s += h[at + j] * g[j];
    float gate = 1.f / (1.f + expf(-block_sum(s, scratch)));
    for (int j = threadIdx.x; j < d; j += blockDim.x) out[at + j] += gate * y[at + j];
}

// x (n) f32 -> y (n) f16
extern "C" __global__ void to_half(const float* __restrict__ x, __half* __restrict__ y, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = __float2half_rn(x[i]);
}
"""


def template_names() -> list[str]:
    """The template instances runtime/gpu.py asks NVRTC for."""
    names = []
    for struct in TYPE_STRUCTS.values():
        names += [f"matvec<{struct}, false>", f"matvec<{struct}, true>", f"moe_matvec<{struct}>",
                  f"dequant<{struct}, float>", f"dequant<{struct}, __half>"]
    for kv in ("__half", "float"):
        names += [f"qkv_post<{kv}>", f"attention<{kv}, {ATTENTION_WARPS}>"]
    return names
