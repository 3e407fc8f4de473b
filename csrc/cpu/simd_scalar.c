/*
 * simd_scalar.c -- msattn_simd_scalar: simd_kernels.h in plain C11 (vectors of one float).
 * Always built, always correct, the fallback on any CPU and the baseline the tests compare with.
 */
#define MSATTN_ISA MSATTN_ISA_SCALAR
#include "simd_kernels.h"
