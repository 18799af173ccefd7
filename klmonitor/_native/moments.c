/* klmonitor: one fused pass over float32 log-probs computing the shifted first and second
 * moments of the six per-token quantities KLStats reports (k1, k2, k3, kl_pq, r - 1, k2 - k3),
 * plus the counts of valid, non-finite and clamped tokens and the largest |log-ratio|.
 *
 * Written for gcc/clang auto-vectorisation: no calls inside the loop (exp is a polynomial
 * with bit-level scaling (an expm1, precise near 0), min/max are plain comparisons, the max reduction runs on the
 * integer bit pattern of non-negative floats, which orders like the floats themselves).
 * Accumulators are double: with per-quantity shifts close to the mean, the variance keeps
 * full precision even when the mean is far larger than the spread.
 *
 * The math matches klmonitor/estimators.py; tests compare the two paths.
 * Build: cc -O3 -march=native -fno-math-errno -fassociative-math -fno-signed-zeros
 *        -fno-trapping-math -ffp-contract=fast -shared -fPIC (see klmonitor/_native/__init__.py).
 */
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define NQ 6          /* k1, k2, k3, kl_pq, r - 1, k2 - k3 */
#define NOUT 16       /* S1[6], S2[6], count, nonfinite, clamped, max|l| */
#define FLT_BIG 3.402823466e38f

static inline float maxf(float a, float b) { return a > b ? a : b; }
static inline float minf(float a, float b) { return a < b ? a : b; }
static inline float absf(float a) { return a < 0.f ? -a : a; }

/* The six quantities of one clamped, finite log-ratio lc (|lc| <= 80), sharing one
 * polynomial. Range reduction lc = n ln2 + r with |r| <= ln2 / 2, then with
 * c(r) = 1/6 + r/24 + r^2/120 + ... (to r^6/9!: truncation below 1e-9 relative),
 *   expm1(r) - r = r^2 (1/2 + r c)      (no cancellation: a series)
 *   expm1(r)     = r + that
 * For n = 0 (|lc| < ~0.347, the usual regime) r == lc: k3 is the series itself and
 * k2 - k3 = -r^3 c, so nothing cancels. For n != 0, e^lc - 1 = 2^n expm1(r) + (2^n - 1),
 * with 2^n built from the float's exponent bits and 2^n - 1 exact; k3 = (e^lc - 1) - lc then
 * loses at most a few ulps (|lc| > 0.347). */
static inline void quantities(float lc, float q[NQ]) {
    const float LOG2E = 1.44269504088896341f;
    const float LN2_HI = 0.693359375f, LN2_LO = -2.12194440e-4f;
    float n = __builtin_floorf(lc * LOG2E + 0.5f);
    float r = lc - n * LN2_HI;
    r = r - n * LN2_LO;
    float c = 1.f / 362880.f;
    c = c * r + 1.f / 40320.f;
    c = c * r + 1.f / 5040.f;
    c = c * r + 1.f / 720.f;
    c = c * r + 1.f / 120.f;
    c = c * r + 1.f / 24.f;
    c = c * r + 1.f / 6.f;
    float r2 = r * r;
    float k3r = r2 * (0.5f + r * c);
    union { int32_t i; float f; } scale;
    scale.i = ((int32_t)n + 127) << 23;
    int small = n == 0.f;
    float em1 = small ? r + k3r : scale.f * (r + k3r) + (scale.f - 1.f);
    float k3 = maxf(small ? k3r : em1 - lc, 0.f);
    float k2 = 0.5f * lc * lc;
    q[0] = -lc;
    q[1] = k2;
    q[2] = k3;
    q[3] = maxf(em1 * lc - k3, 0.f);        /* kl_pq = r l - (r - 1) = (r - 1) l - k3 */
    q[4] = em1;
    q[5] = small ? -r2 * r * c : k2 - k3;
}

/* Mean of the six quantities over up to 256 valid tokens spread evenly over [0, n): the
 * shifts that keep the accumulated second moments well conditioned. 0 if none is valid. */
void klm_sample_shift(const float* logp, const float* ref, const uint8_t* mask, int64_t n,
                      float clamp, float* shift) {
    double acc[NQ] = {0};
    double cnt = 0;
    int64_t stride = n / 256 > 1 ? n / 256 : 1;
    int64_t seen = 0;
    for (int64_t i = 0; i < n && seen < 256 * stride; i += stride, seen += stride) {
        float l = ref[i] - logp[i];
        if (!(absf(l) <= FLT_BIG) || (mask && !mask[i])) continue;
        float q[NQ];
        quantities(minf(maxf(l, -clamp), clamp), q);
        for (int k = 0; k < NQ; k++) acc[k] += q[k];
        cnt += 1;
    }
    for (int k = 0; k < NQ; k++) shift[k] = cnt > 0 ? (float)(acc[k] / cnt) : 0.f;
}

/* One block of at most BLOCK tokens, accumulated in float (exact for the counts; for the
 * shifted sums, at most ~BLOCK/8 additions per vector lane, a relative error far below the
 * statistics' own), then added to the double totals: float lanes are twice as wide as double
 * ones, and this loop is bound by arithmetic, not memory. The squares of k2 - k3, which is of
 * order l^3 and so underflows float's normal range for |l| below ~3e-7, are summed in double;
 * the other squares leave float's normal range only for variances below ~1e-38. */
#define BLOCK 512
#define BODY(MASK_EXPR, ACC_T)                                                                 \
    for (int64_t i = blo; i < bhi; i++) {                                                 \
        float l = ref[i] - logp[i];                                                       \
        float m = (MASK_EXPR);                                                            \
        int finite = absf(l) <= FLT_BIG;  /* false for +-inf and NaN */                   \
        float g = finite ? m : 0.f;                                                       \
        float lz = g > 0.f ? l : 0.f;                                                     \
        float alz = absf(lz);                                                             \
        float q[NQ];                                                                      \
        quantities(minf(maxf(lz, -clamp), clamp), q);                                     \
        float d0 = (q[0] - s0) * g, d1 = (q[1] - s1) * g, d2 = (q[2] - s2) * g;           \
        float d3 = (q[3] - s3) * g, d4 = (q[4] - s4) * g, d5 = (q[5] - s5) * g;           \
        fa0 += d0; fb0 += (ACC_T)d0 * d0;                                                 \
        fa1 += d1; fb1 += (ACC_T)d1 * d1;                                                 \
        fa2 += d2; fb2 += (ACC_T)d2 * d2;                                                 \
        fa3 += d3; fb3 += (ACC_T)d3 * d3;                                                 \
        fa4 += d4; fb4 += (ACC_T)d4 * d4;                                                 \
        fa5 += d5; fb5 += (double)d5 * d5;                                                \
        fcnt += g;                                                                        \
        fnonfinite += finite ? 0.f : m;                                                   \
        fclamped += alz > clamp ? 1.f : 0.f;                                              \
        union { float f; int32_t i; } bits;                                               \
        bits.f = alz;                                                                     \
        maxbits = maxbits > bits.i ? maxbits : bits.i;                                    \
    }

/* Shifted sums over tokens [lo, hi) with ACC_T block accumulators (see BODY). */
#define DEFINE_RANGE(NAME, ACC_T)                                                             \
static void NAME(const float* restrict logp, const float* restrict ref,                       \
                 const uint8_t* restrict mask, int64_t lo, int64_t hi,                        \
                 const float* shift, float clamp, double* out) {                              \
    const float s0 = shift[0], s1 = shift[1], s2 = shift[2];                                  \
    const float s3 = shift[3], s4 = shift[4], s5 = shift[5];                                  \
    double a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0;                                    \
    double b0 = 0, b1 = 0, b2 = 0, b3 = 0, b4 = 0, b5 = 0;                                    \
    double cnt = 0, nonfinite = 0, clamped = 0;                                               \
    int32_t maxbits = 0;                                                                      \
    for (int64_t blo = lo; blo < hi; blo += BLOCK) {                                          \
        int64_t bhi = blo + BLOCK < hi ? blo + BLOCK : hi;                                    \
        ACC_T fa0 = 0, fa1 = 0, fa2 = 0, fa3 = 0, fa4 = 0, fa5 = 0;                           \
        ACC_T fb0 = 0, fb1 = 0, fb2 = 0, fb3 = 0, fb4 = 0;                                    \
        double fb5 = 0;                                                                       \
        float fcnt = 0, fnonfinite = 0, fclamped = 0;                                         \
        if (mask) {                                                                           \
            BODY((float)(mask[i] != 0), ACC_T)                                                \
        } else {                                                                              \
            BODY(1.f, ACC_T)                                                                  \
        }                                                                                     \
        a0 += fa0; a1 += fa1; a2 += fa2; a3 += fa3; a4 += fa4; a5 += fa5;                     \
        b0 += fb0; b1 += fb1; b2 += fb2; b3 += fb3; b4 += fb4; b5 += fb5;                     \
        cnt += fcnt; nonfinite += fnonfinite; clamped += fclamped;                            \
    }                                                                                         \
    out[0] = a0; out[1] = a1; out[2] = a2; out[3] = a3; out[4] = a4; out[5] = a5;             \
    out[6] = b0; out[7] = b1; out[8] = b2; out[9] = b3; out[10] = b4; out[11] = b5;           \
    out[12] = cnt; out[13] = nonfinite; out[14] = clamped;                                    \
    union { int32_t i; float f; } mx;                                                         \
    mx.i = maxbits;                                                                           \
    out[15] = mx.f;                                                                           \
}

DEFINE_RANGE(range_float_blocks, float)
DEFINE_RANGE(range_double, double)

/* Float block sums are safe while every squared quantity times BLOCK stays far below
 * FLT_MAX: |values| <= e^30 * 30 for |l| <= 30. Larger clamps take the double path. */
#define FLOAT_BLOCKS_UP_TO 30.f

/* Shifted sums over tokens [lo, hi): out = S1[6], S2[6], count, nonfinite, clamped, max|l|.
 * mask may be NULL (every token valid); otherwise a token is valid where mask is nonzero. */
void klm_token_moments(const float* logp, const float* ref, const uint8_t* mask, int64_t lo,
                       int64_t hi, const float* shift, float clamp, double* out) {
    if (clamp <= FLOAT_BLOCKS_UP_TO) {
        range_float_blocks(logp, ref, mask, lo, hi, shift, clamp, out);
    } else {
        range_double(logp, ref, mask, lo, hi, shift, clamp, out);
    }
}

/* The same over [0, n) split across the OpenMP team: out_parts holds NOUT values per thread
 * (rows beyond the team's size are left untouched; the caller zeroes them). Built with
 * -fopenmp, this shares torch's own OpenMP runtime (libgomp.so.1 is loaded once per process),
 * so the kernel runs on torch's worker threads instead of competing with them. */
int klm_token_moments_parallel(const float* logp, const float* ref, const uint8_t* mask,
                               int64_t n, const float* shift, float clamp, double* out_parts,
                               int nthreads) {
#ifdef _OPENMP
    #pragma omp parallel num_threads(nthreads)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        int64_t lo = n * t / nt, hi = n * (t + 1) / nt;
        klm_token_moments(logp, ref, mask, lo, hi, shift, clamp, out_parts + (int64_t)NOUT * t);
    }
    return 1;
#else
    (void)logp; (void)ref; (void)mask; (void)n; (void)shift; (void)clamp; (void)out_parts;
    (void)nthreads;
    return 0;
#endif
}
