/*
 * simd_avx512.c -- msattn_simd_avx512: simd_kernels.h compiled for AVX-512 (F, BW, VL, DQ).
 * The target pragma scopes the instruction set to this file; simd.c only calls it on CPUs that
 * report AVX-512, so the library as a whole still runs on any x86-64.
 */
#if defined(__x86_64__) || defined(_M_X64)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx2"))), apply_to = function)
#else
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx2")
#endif
#define MSATTN_ISA MSATTN_ISA_AVX512
#include "simd_kernels.h"
#if defined(__clang__)
#pragma clang attribute pop
#endif
#else
#include "simd.h"
/* not an x86-64 build: the dispatcher never picks this table; it points at the scalar loops */
const msattn_simd_ops msattn_simd_avx512 = {0};
const msattn_simd_ops msattn_simd_amx = {0};
#endif
