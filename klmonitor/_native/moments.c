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

#define NQ 6          /* k1, k2, k3, kl_pq, r - 1, k2 - k3 */
#define NOUT 16       /* S1[6], S2[6], count, nonfinite, clamped, max|l| */
/* Below this |l| the series is used (in float32 it beats expm1(l) - l there:
 * 0.34 < ln2 / 2, so expm1's range reduction would not help, and the series' truncation
 * after l^9 stays below 3e-9 relative). Above it, expm1_poly's n != 0 branch. */
#define TAYLOR_BELOW 0.34f
#define FLT_BIG 3.402823466e38f

static inline float maxf(float a, float b) { return a > b ? a : b; }
static inline float minf(float a, float b) { return a < b ? a : b; }
static inline float absf(float a) { return a < 0.f ? -a : a; }

/* e^x - 1 for |x| <= 88 without cancellation near 0: x = n ln2 + r with |r| <= ln2 / 2,
 * expm1(r) by its Taylor polynomial to r^8 (truncation below 2e-8 relative), then
 * e^x - 1 = 2^n expm1(r) + (2^n - 1), where 2^n is built from the float's exponent bits and
 * 2^n - 1 is exact. For |x| < ln2 / 2, n = 0 and the result is the polynomial itself. */
static inline float expm1_poly(float x) {
    const float LOG2E = 1.44269504088896341f;
    const float LN2_HI = 0.693359375f, LN2_LO = -2.12194440e-4f;
    float n = __builtin_floorf(x * LOG2E + 0.5f);
    float r = x - n * LN2_HI;
    r = r - n * LN2_LO;
    float p = 1.f / 40320.f;
    p = p * r + 1.f / 5040.f;
    p = p * r + 1.f / 720.f;
    p = p * r + 1.f / 120.f;
    p = p * r + 1.f / 24.f;
    p = p * r + 1.f / 6.f;
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r;
    union { int32_t i; float f; } scale;
    scale.i = ((int32_t)n + 127) << 23;
    return scale.f * p + (scale.f - 1.f);
}

/* The six quantities of one clamped, finite log-ratio lc. */
static inline void quantities(float lc, float q[NQ]) {
    float l2 = lc * lc;
    /* c = 1/6 + l/24 + l^2/120 + ...: k3 = l^2 (1/2 + l c) and k2 - k3 = -l^3 c near 0 */
    float c = 1.f / 362880.f;
    c = c * lc + 1.f / 40320.f;
    c = c * lc + 1.f / 5040.f;
    c = c * lc + 1.f / 720.f;
    c = c * lc + 1.f / 120.f;
    c = c * lc + 1.f / 24.f;
    c = c * lc + 1.f / 6.f;
    float k3s = l2 * (0.5f + lc * c);
    int small = absf(lc) < TAYLOR_BELOW;
    float em1 = small ? k3s + lc : expm1_poly(lc);
    float k3 = maxf(small ? k3s : em1 - lc, 0.f);
    float k2 = 0.5f * l2;
    q[0] = -lc;
    q[1] = k2;
    q[2] = k3;
    q[3] = maxf(em1 * lc - k3, 0.f);        /* kl_pq = r l - (r - 1) = (r - 1) l - k3 */
    q[4] = em1;
    q[5] = small ? -l2 * lc * c : k2 - k3;
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

#define BODY(MASK_EXPR)                                                                   \
    for (int64_t i = lo; i < hi; i++) {                                                   \
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
        a0 += d0; b0 += (double)d0 * d0;                                                  \
        a1 += d1; b1 += (double)d1 * d1;                                                  \
        a2 += d2; b2 += (double)d2 * d2;                                                  \
        a3 += d3; b3 += (double)d3 * d3;                                                  \
        a4 += d4; b4 += (double)d4 * d4;                                                  \
        a5 += d5; b5 += (double)d5 * d5;                                                  \
        cnt += g;                                                                         \
        nonfinite += finite ? 0.f : m;                                                    \
        clamped += alz > clamp ? 1.f : 0.f;                                               \
        union { float f; int32_t i; } bits;                                               \
        bits.f = alz;                                                                     \
        maxbits = maxbits > bits.i ? maxbits : bits.i;                                    \
    }

/* Shifted sums over tokens [lo, hi): out = S1[6], S2[6], count, nonfinite, clamped, max|l|.
 * mask may be NULL (every token valid); otherwise a token is valid where mask is nonzero. */
void klm_token_moments(const float* restrict logp, const float* restrict ref,
                       const uint8_t* restrict mask, int64_t lo, int64_t hi,
                       const float* shift, float clamp, double* out) {
    const float s0 = shift[0], s1 = shift[1], s2 = shift[2];
    const float s3 = shift[3], s4 = shift[4], s5 = shift[5];
    double a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0;
    double b0 = 0, b1 = 0, b2 = 0, b3 = 0, b4 = 0, b5 = 0;
    double cnt = 0, nonfinite = 0, clamped = 0;
    int32_t maxbits = 0;
    if (mask) {
        BODY((float)(mask[i] != 0))
    } else {
        BODY(1.f)
    }
    out[0] = a0; out[1] = a1; out[2] = a2; out[3] = a3; out[4] = a4; out[5] = a5;
    out[6] = b0; out[7] = b1; out[8] = b2; out[9] = b3; out[10] = b4; out[11] = b5;
    out[12] = cnt; out[13] = nonfinite; out[14] = clamped;
    union { int32_t i; float f; } mx;
    mx.i = maxbits;
    out[15] = mx.f;
}
