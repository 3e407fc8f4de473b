/*
 * simd.c -- run-time choice of the instruction set.
 *
 * The best table this CPU can run is chosen on first use (cpuid via the compiler's builtins). The
 * environment variable MSATTN_ISA=amx|avx512|avx2|scalar, or msattn_isa_set(), forces another one; the
 * tests use that to run every path on one machine. The choice is an atomic pointer: a kernel reads it
 * once per work item; the ATen glue keeps a switch from landing inside an op call (run_items.h).
 */
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

static _Atomic(const msattn_simd_ops *) msattn_current = NULL;

static int msattn_cpu_has(const char *isa) {
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    if (strcmp(isa, "avx512") == 0)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
               __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    if (strcmp(isa, "amx") == 0) return msattn_cpu_has("avx512") && msattn_amx_usable();
    if (strcmp(isa, "avx2") == 0)
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
               __builtin_cpu_supports("f16c");
#endif
    return strcmp(isa, "scalar") == 0;
}

static const msattn_simd_ops *msattn_table(const char *name) {
    if (strcmp(name, "amx") == 0) return &msattn_simd_amx;
    if (strcmp(name, "avx512") == 0) return &msattn_simd_avx512;
    if (strcmp(name, "avx2") == 0) return &msattn_simd_avx2;
    if (strcmp(name, "scalar") == 0) return &msattn_simd_scalar;
    return NULL;
}

static const msattn_simd_ops *msattn_best(void) {
    if (msattn_cpu_has("amx")) return &msattn_simd_amx;
    if (msattn_cpu_has("avx512")) return &msattn_simd_avx512;
    if (msattn_cpu_has("avx2")) return &msattn_simd_avx2;
    return &msattn_simd_scalar;
}

int msattn_isa_set(const char *name) {
    if (name == NULL) return MSATTN_ERR_ARG;
    if (strcmp(name, "auto") == 0) {
        atomic_store(&msattn_current, msattn_best());
        return MSATTN_OK;
    }
    const msattn_simd_ops *t = msattn_table(name);
    if (t == NULL || !msattn_cpu_has(name)) return MSATTN_ERR_ARG;
    atomic_store(&msattn_current, t);
    return MSATTN_OK;
}

const msattn_simd_ops *msattn_simd(void) {
    const msattn_simd_ops *t = atomic_load(&msattn_current);
    if (t == NULL) {
        /* every thread that gets here computes the same table; an unusable MSATTN_ISA is refused by
           msattn's Python import (msattn.ops), so C callers alone fall back to the best table */
        const char *env = getenv("MSATTN_ISA");
        if (env == NULL || *env == 0 || msattn_isa_set(env) != MSATTN_OK) atomic_store(&msattn_current, msattn_best());
        t = atomic_load(&msattn_current);
    }
    return t;
}

const char *msattn_isa_name(void) { return msattn_simd()->name; }
