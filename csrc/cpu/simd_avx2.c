/*
 * simd_avx2.c -- msattn_simd_avx2: simd_kernels.h compiled for AVX2 with FMA and F16C.
 */
#if defined(__x86_64__) || defined(_M_X64)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC target("avx2,fma,f16c")
#endif
#define MSATTN_ISA MSATTN_ISA_AVX2
#include "simd_kernels.h"
#if defined(__clang__)
#pragma clang attribute pop
#endif
#else
#include "simd.h"
const msattn_simd_ops msattn_simd_avx2 = {0};
#endif
