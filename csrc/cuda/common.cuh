/*
 * common.cuh -- what every CUDA kernel of msattn shares: element loads and stores with dtype
 * conversion (fp32 compute whatever the storage), warp and block reductions and scans, RoPE on a
 * shared-memory tile, and the host-side helpers of the launchers (shared-memory opt-in, status).
 *
 * Contract: device helpers named ms_block_* must be reached by every thread of the block (they
 * contain __syncthreads) and need blockDim.x to be a multiple of 32, at most 1024. Nothing here
 * allocates; nothing aborts. Index and position arithmetic is NOT here: it lives in
 * ../msattn_regions.h, shared with the C kernels, so the CPU tests exercise it.
 *
 * Legend: D head dim; rows/ld of a shared tile in floats; half = rope.dim / 2.
 */
#ifndef MSATTN_CUDA_COMMON_CUH
#define MSATTN_CUDA_COMMON_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "../msattn.h"
#include "../msattn_regions.h"

#define MS_FULL_MASK 0xffffffffu
#define MS_LOG2E 1.4426950408889634
#define MS_LN2 0.6931471805599453

// ----------------------------------------------------------------------------------------------
// element access: strided views, any storage dtype, fp32 (or exact fp64) in registers

/* element `off` of a view's data as fp32; conversions from 16-bit formats are exact */
__device__ __forceinline__ float ms_load(const void *base, int64_t off, msattn_dtype dt) {
    switch (dt) {
    case MSATTN_F32: return static_cast<const float *>(base)[off];
    case MSATTN_BF16:
        return __uint_as_float(static_cast<uint32_t>(static_cast<const unsigned short *>(base)[off]) << 16);
    case MSATTN_F16: return __half2float(__ushort_as_half(static_cast<const unsigned short *>(base)[off]));
    default: return static_cast<float>(static_cast<const double *>(base)[off]);
    }
}

/* element `off` as double: exact for every dtype (the selection means are taken in double) */
__device__ __forceinline__ double ms_load_f64(const void *base, int64_t off, msattn_dtype dt) {
    if (dt == MSATTN_F64) return static_cast<const double *>(base)[off];
    return static_cast<double>(ms_load(base, off, dt));
}

/* element `off` = v rounded to nearest even in dtype (16-bit overflow gives inf, like the CPU) */
__device__ __forceinline__ void ms_store(void *base, int64_t off, msattn_dtype dt, float v) {
    switch (dt) {
    case MSATTN_F32: static_cast<float *>(base)[off] = v; break;
    case MSATTN_BF16:
        static_cast<unsigned short *>(base)[off] = __bfloat16_as_ushort(__float2bfloat16_rn(v));
        break;
    case MSATTN_F16: static_cast<unsigned short *>(base)[off] = __half_as_ushort(__float2half_rn(v)); break;
    default: static_cast<double *>(base)[off] = static_cast<double>(v);
    }
}

/* offset of element (b, h, t, d) of a view */
__device__ __forceinline__ int64_t ms_off(const msattn_view &v, int64_t b, int64_t h, int64_t t, int64_t d) {
    return b * v.sb + h * v.sh + t * v.sn + d * v.sd;
}

__device__ __forceinline__ bool ms_key_valid(const uint8_t *mask, int64_t mask_sb, int64_t b, int64_t t) {
    return mask == nullptr || mask[b * mask_sb + t] != 0;
}

// ----------------------------------------------------------------------------------------------
// tensor cores (sm_80 and later): 16-bit rounding and packing, and mma.sync m16n8k16 with fp32
// accumulators, shared by the attention kernels (ms_attention.cu) and the selection's screen (select.cu)

template <bool BF16>
__device__ __forceinline__ uint16_t ms_to16(float x) {
    if constexpr (BF16) return __bfloat16_as_ushort(__float2bfloat16_rn(x));
    else return __half_as_ushort(__float2half_rn(x));
}

/* a 16-bit element (the low 16 bits of x) as float: exact */
template <bool BF16>
__device__ __forceinline__ float ms_from16(uint32_t x) {
    if constexpr (BF16) return __uint_as_float(x << 16);
    else return __half2float(__ushort_as_half((unsigned short)x));
}

template <bool BF16>
__device__ __forceinline__ uint32_t ms_pack16(float lo, float hi) {
    return (uint32_t)ms_to16<BF16>(lo) | ((uint32_t)ms_to16<BF16>(hi) << 16);
}

/* d[0..3] += A (16x16, row) * B (16x8, col), fp32 accumulate */
template <bool BF16>
__device__ __forceinline__ void ms_mma16816(float *d, const uint32_t *a, uint32_t b0, uint32_t b1) {
    if constexpr (BF16)
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                     "{%8,%9}, {%0,%1,%2,%3};"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    else
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                     "{%8,%9}, {%0,%1,%2,%3};"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/* A fragment (16 x 16, row-major) of a 16-bit shared tile: rows [r0, r0 + 16), columns [c0, c0 + 16) */
__device__ __forceinline__ void ms_frag_a(uint32_t *a, const uint16_t *t, int ld, int r0, int c0) {
    const int g = (threadIdx.x & 31) >> 2, t4 = threadIdx.x & 3;
    const uint16_t *p0 = t + (r0 + g) * ld + c0 + 2 * t4, *p8 = p0 + 8 * ld;
    a[0] = *reinterpret_cast<const uint32_t *>(p0);
    a[1] = *reinterpret_cast<const uint32_t *>(p8);
    a[2] = *reinterpret_cast<const uint32_t *>(p0 + 8);
    a[3] = *reinterpret_cast<const uint32_t *>(p8 + 8);
}

// ----------------------------------------------------------------------------------------------
// warp reductions: butterflies, so every lane gets the result and the order of the additions is
// fixed (lane-independent), which keeps results deterministic

__device__ __forceinline__ float ms_warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(MS_FULL_MASK, x, o);
    return x;
}

/* the double sum, every addition rounded to nearest (nothing contracted) */
__device__ __forceinline__ double ms_warp_sum_f64(double x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = __dadd_rn(x, __shfl_xor_sync(MS_FULL_MASK, x, o));
    return x;
}

/* max that ignores NaN like fmaxf: NaN scores still reach the sum through exp2(NaN) = NaN */
__device__ __forceinline__ float ms_warp_max(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(MS_FULL_MASK, x, o));
    return x;
}

// ----------------------------------------------------------------------------------------------
// block reductions and scan over int; `red` is __shared__ int[33]. Every thread must call.

__device__ __forceinline__ int ms_block_sum_int(int v, int *red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(MS_FULL_MASK, v, o);
    if (lane == 0) red[warp] = v;
    __syncthreads();
    int t = 0;
    for (int w = 0; w < nw; ++w) t += red[w];
    __syncthreads(); /* red may be reused by the next call */
    return t;
}

__device__ __forceinline__ int ms_block_min_int(int v, int *red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = min(v, __shfl_xor_sync(MS_FULL_MASK, v, o));
    if (lane == 0) red[warp] = v;
    __syncthreads();
    int t = red[0];
    for (int w = 1; w < nw; ++w) t = min(t, red[w]);
    __syncthreads();
    return t;
}

/* exclusive prefix sum of v over the threads in threadIdx order; *total = sum over the block */
__device__ __forceinline__ int ms_block_excl_scan(int v, int *total, int *red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    int incl = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int n = __shfl_up_sync(MS_FULL_MASK, incl, o);
        if (lane >= o) incl += n;
    }
    if (lane == 31) red[warp] = incl;
    __syncthreads();
    int before = 0, all = 0;
    for (int w = 0; w < nw; ++w) {
        before += w < warp ? red[w] : 0;
        all += red[w];
    }
    __syncthreads();
    *total = all;
    return before + incl - v;
}

// ----------------------------------------------------------------------------------------------
// RoPE on rows of a shared tile, pairs (x[i], x[i + half]) as in the CPU's ms_rope_rotate:
// row r is rotated by the angles of position pos[r] (sign +1) or back (sign -1); pos[r] < 0, or a
// position outside the table, leaves the row alone. One thread per pair, so no two threads touch
// one element; the caller syncs before and after.

/* the pair (x1, x2) rotated by the angle of cosine c and sine s, as the CPU's ms_rope_rotate */
__device__ __forceinline__ void ms_rotate_pair(float &x1, float &x2, float c, float s) {
    const float y1 = x1 * c - x2 * s, y2 = x2 * c + x1 * s;
    x1 = y1;
    x2 = y2;
}

__device__ __forceinline__ void ms_rope_tile(float *x, int ld, int rows, const int *pos, const msattn_rope &r,
                                             float sign) {
    const int half = r.dim / 2;
    for (int e = threadIdx.x; e < rows * half; e += blockDim.x) {
        const int row = e / half, i = e % half, ps = pos[row];
        if (ps < 0 || ps >= r.len) continue;
        float *xr = x + (int64_t)row * ld;
        ms_rotate_pair(xr[i], xr[i + half], r.cos[(int64_t)ps * half + i], sign * r.sin[(int64_t)ps * half + i]);
    }
}

// ----------------------------------------------------------------------------------------------
// host side of the launchers

static inline int64_t ms_round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

/* the error code of the last launch: MSATTN_ERR_CUDA leaves the CUDA error in place for the
 * caller (cudaGetLastError() says why) */
static inline int ms_launch_status() {
    return cudaPeekAtLastError() == cudaSuccess ? MSATTN_OK : MSATTN_ERR_CUDA;
}

/* allow `kernel` `bytes` of dynamic shared memory on the current device (opt-in beyond 48 KB);
 * MSATTN_ERR_ARG when the device has less (head dims > 128 need an A100/H100-class part) */
template <class Kernel>
static inline int ms_set_smem(Kernel kernel, size_t bytes) {
    int dev = 0, optin = 0;
    if (cudaGetDevice(&dev) != cudaSuccess) return MSATTN_ERR_CUDA;
    if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess)
        return MSATTN_ERR_CUDA;
    if (bytes > (size_t)optin) return MSATTN_ERR_ARG;
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes) != cudaSuccess)
        return MSATTN_ERR_CUDA;
    return MSATTN_OK;
}

#endif /* MSATTN_CUDA_COMMON_CUH */
