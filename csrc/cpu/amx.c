/*
 * amx.c -- the selection's first screening pass on AMX tiles (bf16 products, fp32 accumulation).
 *
 * msattn_screen_amx scores up to 16 query-region means against a panel of 64 key-region sums, both
 * rounded to bf16, with TDPBF16PS into four 16 x 16 fp32 tiles, then bounds each score as the float
 * screen does (screen_bounds.h) with a margin wide enough for bf16. The bounds only decide which
 * candidates get exact scores, so the selection is the same bit for bit as without AMX.
 *
 * The margin. q and k are each split into two bf16 parts, x = x_hi + x_lo + r with x_hi = bf16(x),
 * x_lo = bf16(x - x_hi) and |r_i| <= 2^-16 |x_i|, and the score is q_hi . k_hi + q_lo . k_hi + q_hi . k_lo
 * (three tile products into one fp32 accumulator; "bf16x3"). What it leaves out, q_lo . k_lo and the
 * residuals against the other factor, is at most 3.1 2^-16 sum |q_i k_i|; accumulating 3 dp products
 * in fp32 adds (3 dp + 2) 2^-24 of (1.01) sum |q_i k_i|; dividing by the count and the float query's own
 * rounding (against the double mean) add 2^-23. So |f - exact| <= (2^-14 + (3 dp + 8) 2^-24) |q| |k| /
 * count (Cauchy-Schwarz): qbound is twice that factor times |q| (the factor 2 covers the rounding of
 * the bound), about 2^-13 |q| against 2^-6 for a single bf16 product, whose margins let through so
 * many candidates that the exact pass cost more than the products saved. AMX treats bf16 denormals
 * as zero and flushes fp32 denormals: at most 2^-126 per element product and per addition, covered by
 * 2^-116 sqrt(dp) in qbound (k's denormals against q, through kscale) and qabs = 2^-116 (sqrt(dp) |q| +
 * dp), applied through 1 / count.
 *
 * The tile state: msattn_amx_begin loads the configuration on the calling thread (another library may
 * have changed it since) and msattn_amx_end releases the tiles; a pass of screen_amx calls runs between
 * the two with nothing else in between (loading and releasing around every call cost more than the
 * products: the unit starts cold each time). Linux hands the tile state to a process only on
 * request (arch_prctl ARCH_REQ_XCOMP_PERM); msattn_amx_usable asks once.
 */
#define _GNU_SOURCE /* syscall() */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "simd.h"

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__)) && defined(__linux__)
#include <cpuid.h>
#include <stdatomic.h>
#include <sys/syscall.h>
#include <unistd.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx2"))), apply_to = function)
#else
#pragma GCC target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx2")
#endif
#include <immintrin.h>

#include "screen_bounds.h"

#define MS_ARCH_REQ_XCOMP_PERM 0x1023
#define MS_XFEATURE_XTILEDATA 18

static int ms_amx_probe(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    const int tile = (d >> 24) & 1, bf16 = (d >> 22) & 1;
    if (!tile || !bf16) return 0; /* AMX-TILE, AMX-BF16 */
    if (!__get_cpuid(1, &a, &b, &c, &d) || !((c >> 27) & 1)) return 0; /* OSXSAVE */
    return syscall(SYS_arch_prctl, MS_ARCH_REQ_XCOMP_PERM, MS_XFEATURE_XTILEDATA) == 0;
}

int msattn_amx_usable(void) {
    static atomic_int state = 0; /* 0 unknown, 1 usable, 2 not */
    int s = atomic_load(&state);
    if (s == 0) {
        s = ms_amx_probe() ? 1 : 2;
        atomic_store(&state, s);
    }
    return s == 1;
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} ms_tile_config;

/* tiles 0-3: 16 x 64 fp32 scores; 4, 5: 16 query rows x 32 dims (hi, lo); 6, 7: 16 dim pairs x 16
 * columns (hi, lo). A static
 * object: a configuration built on the stack was optimised away (GCC 12 does not see ldtilecfg read it) */
static const ms_tile_config ms_config = {1, 0, {0}, {64, 64, 64, 64, 64, 64, 64, 64}, {16, 16, 16, 16, 16, 16, 16, 16}};

void msattn_amx_begin(void) { _tile_loadconfig(&ms_config); }

void msattn_amx_end(void) { _tile_release(); }

void msattn_screen_amx(uint64_t *keep, float *lanes, int64_t ldl, float *lomax, float *himax, int64_t ldm,
                       const uint16_t *qb, int64_t ldq, int rows, const uint16_t *kb, int dp, const float *kaux,
                       const float *qbound, const float *qabs, const float *lim, const uint64_t *valid) {
    /* a row of qb: dp q_hi, then dp q_lo; the panel: 64 x dp k_hi, then 64 x dp k_lo */
    const uint16_t *qlo = qb + dp, *klo = kb + (int64_t)64 * dp;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int k = 0; k < dp / 32; ++k) {
        _tile_loadd(4, qb + k * 32, ldq * 2);
        _tile_loadd(5, qlo + k * 32, ldq * 2);
#define MS_AMX_COLUMNS(j)                                              \
        _tile_loadd(6, kb + (int64_t)(k * 4 + j) * 512, 64);           \
        _tile_dpbf16ps(j, 4, 6);                                       \
        _tile_dpbf16ps(j, 5, 6);                                       \
        _tile_loadd(7, klo + (int64_t)(k * 4 + j) * 512, 64);          \
        _tile_dpbf16ps(j, 4, 7);
        MS_AMX_COLUMNS(0)
        MS_AMX_COLUMNS(1)
        MS_AMX_COLUMNS(2)
        MS_AMX_COLUMNS(3)
#undef MS_AMX_COLUMNS
    }
    float s[16 * 64] __attribute__((aligned(64)));
    _tile_stored(0, s, 256);
    _tile_stored(1, s + 16, 256);
    _tile_stored(2, s + 32, 256);
    _tile_stored(3, s + 48, 256);
    for (int r = 0; r < rows; ++r) {
        float ends[2];
        const uint64_t m = ms_bounds_row_avx512(lanes + r * ldl, ends, s + 64 * r, kaux, kaux + 64, qbound[r], qabs[r],
                                                lim != NULL ? lim[r] : INFINITY, valid[r]);
        if (keep != NULL) keep[r] = m;
        lomax[r * ldm] = ends[0];
        himax[r * ldm] = ends[1];
    }
}

#if defined(__clang__)
#pragma clang attribute pop
#endif

#else /* no AMX on this platform */
int msattn_amx_usable(void) { return 0; }
void msattn_amx_begin(void) {}
void msattn_amx_end(void) {}
void msattn_screen_amx(uint64_t *keep, float *lanes, int64_t ldl, float *lomax, float *himax, int64_t ldm,
                       const uint16_t *qb, int64_t ldq, int rows, const uint16_t *kb, int dp, const float *kaux,
                       const float *qbound, const float *qabs, const float *lim, const uint64_t *valid) {
    (void)keep; (void)lim; (void)lanes; (void)ldl; (void)lomax; (void)himax; (void)ldm; (void)qb; (void)ldq; (void)rows; (void)kb; (void)dp; (void)kaux; (void)qbound;
    (void)qabs; (void)valid;
}
#endif

void msattn_amx_bounds(double qnorm, int dp, float *qbound, float *qabs) {
    const double rel = 0x1p-14 + (double)(3 * dp + 8) * 0x1p-24;
    *qbound = msattn_float_up(2.0 * rel * qnorm + 0x1p-116 * sqrt((double)dp));
    *qabs = msattn_float_up(0x1p-116 * (sqrt((double)dp) * qnorm + (double)dp));
}
