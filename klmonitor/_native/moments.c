/* klmonitor: one fused pass over float32 log-probs computing the shifted first and second
 * moments of the six per-token quantities KLStats reports (k1, k2, k3, kl_pq, r - 1, k2 - k3),
 * plus the counts of valid, non-finite and extreme tokens (|log-ratio| above a threshold) and
 * the largest |log-ratio|.
 *
 * Two implementations of the same math, both in every x86-64 build, chosen at run time:
 *  - portable C written for gcc/clang auto-vectorisation (no calls inside the loop: exp is a
 *    polynomial with bit-level scaling (an expm1, precise near 0), min/max are comparisons,
 *    the max reduction runs on the integer bit pattern of non-negative floats, which orders
 *    like the floats themselves). It is compiled for the baseline of the target (SSE2 on
 *    x86-64) and serves CPUs without AVX2, the last < 8 tokens of a range and the shift
 *    sample;
 *  - AVX2+FMA+F16C intrinsics (x86-64 since 2013) in functions compiled for that target
 *    alone (function target attributes), run only where cpuid says the CPU and the OS
 *    support them (klm_select_isa). gcc vectorised the portable loop 32 tokens at a time and
 *    spilled most of its 17 accumulators to the stack; written by hand, each block is two
 *    loops of 8 tokens whose accumulators fit the 16 vector registers, and vectors whose |l|
 *    are all below 0.34 (the usual regime of RL fine-tuning) skip exp's range reduction: 2.2x
 *    faster per token than the portable loop compiled for AVX2 on that regime, 1.4x elsewhere
 *    (Zen 3, one thread); the baseline (SSE2) build of the portable loop is slower still.
 * Sums are shifted by a sample mean of each quantity, so variances keep their precision even
 * where the mean is far larger than the spread.
 *
 * Exact values at any |log-ratio| (clamp above 30, +inf included): float32 holds e^l only up
 * to l ~ 88, and float block sums of squares only up to |l| ~ 30 (see FLOAT_UP_TO). So the
 * float body takes the tokens with |l| <= 30 and gives the others weight 0; a block in which
 * some valid |l| exceeds min(threshold, 30) (found from the block's max, which the body keeps
 * anyway) is scanned again, and there each token with |l| > 30 is computed in double with
 * libm's expm1 and added to the double sums (rescan_token). Such tokens are rare: the float
 * body pays one compare per 8 tokens for the exclusion (1-2 %), a block holding one pays a
 * second pass over its 512 tokens (vectorised in the AVX2 body) and an expm1 per such token.
 * With a clamp up to 30, every token takes the float body, clamped, and the rescan only
 * counts the extreme ones.
 *
 * The math matches klmonitor/estimators.py; tests compare the paths with each other and with
 * 50-digit values.
 * Built once, at install time, by setup.py (an optional extension; see its flags): no
 * -march=native, so one binary runs on every CPU of its architecture. Loaded with ctypes by
 * klmonitor/_native/__init__.py, which checks it (owner, ELF structure, symbols, ABI and
 * source hash, a self-test) before use.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define NQ 6          /* k1, k2, k3, kl_pq, r - 1, k2 - k3 */
#define NOUT 16       /* S1[6], S2[6], count, nonfinite, extreme, max|l| */
#define FLT_BIG 3.402823466e38f
#define KLM_LN2F 0.693147182f /* ln 2 rounded to float, as torch compares a float32 tensor with it */

static inline float maxf(float a, float b) { return a > b ? a : b; }
static inline float minf(float a, float b) { return a < b ? a : b; }
static inline float absf(float a) { return a < 0.f ? -a : a; }

/* Element types of the log-prob inputs (both inputs share one; codes as in __init__.py). */
enum { KLM_F32 = 0, KLM_BF16 = 1, KLM_F16 = 2 };

static inline float bf16_to_float(uint16_t h) {
    union { uint32_t u; float f; } x;
    x.u = (uint32_t)h << 16;  /* bfloat16 is the top half of a float32 */
    return x.f;
}

static inline float f16_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    union { uint32_t u; float f; } x;
    if (e == 0x1f) {
        x.u = sign | 0x7f800000u | (man << 13);  /* inf, NaN */
    } else if (e != 0) {
        x.u = sign | ((e + 112u) << 23) | (man << 13);  /* normal: rebias 15 -> 127 */
    } else {
        x.f = (float)man * 5.9604644775390625e-8f;  /* zero, subnormal: man * 2^-24 */
        x.u |= sign;
    }
    return x.f;
}

static inline float load1(const void* p, int64_t i, int dtype) {
    if (dtype == KLM_BF16) return bf16_to_float(((const uint16_t*)p)[i]);
    if (dtype == KLM_F16) return f16_to_float(((const uint16_t*)p)[i]);
    return ((const float*)p)[i];
}

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

/* Float block sums are safe while every squared quantity times BLOCK stays far below
 * FLT_MAX: |values| <= e^30 * 30 for |l| <= 30. With a clamp above 30, the tokens with a
 * larger |l| are left to the double rescan (rescan_token). */
#define FLOAT_UP_TO 30.f

/* The largest |l| the float body takes at this clamp (a larger one has weight 0 there):
 * every finite one up to a clamp of 30, those up to 30 above. */
static inline float float_bound(float clamp) { return clamp > FLOAT_UP_TO ? FLOAT_UP_TO : FLT_BIG; }

/* Above l = 700 a token's r = e^l is at float64's limit (r l, its kl_pq, overflows at 703.2):
 * without a clamp below it, such a token is not usable and counts as non-finite, as l = +inf
 * does (klmonitor._moments.LOG_MAX). The largest usable l at this clamp: */
#define LOG_MAX 700.f
static inline float usable_up_to(float clamp) { return clamp > LOG_MAX ? LOG_MAX : FLT_BIG; }

/* A block is scanned again where some valid |l| exceeds this: the extreme threshold, and
 * above a clamp of 30 also 30 (the tokens the float body left out). */
static inline float rescan_bound(float clamp, float threshold) {
    return clamp > FLOAT_UP_TO ? minf(threshold, FLOAT_UP_TO) : threshold;
}

static inline int32_t float_bits(float x) {
    union { float f; int32_t i; } u;
    u.f = x;
    return u.i;
}

/* Mean of the six quantities over up to 256 valid tokens spread evenly over [0, n): the
 * shifts that keep the accumulated second moments well conditioned. 0 if none is valid.
 * Log-ratios are clamped to min(clamp, 30) here, so the shifts stay finite (and within the
 * float body's range) at any clamp. */
void klm_sample_shift(const void* logp, const void* ref, int dtype, const uint8_t* mask,
                      int64_t n, float clamp, float* shift) {
    double acc[NQ] = {0};
    double cnt = 0;
    const float c = minf(clamp, FLOAT_UP_TO);
    int64_t stride = n / 256 > 1 ? n / 256 : 1;
    int64_t seen = 0;
    for (int64_t i = 0; i < n && seen < 256 * stride; i += stride, seen += stride) {
        float l = load1(ref, i, dtype) - load1(logp, i, dtype);
        if (!(absf(l) <= FLT_BIG) || (mask && !mask[i])) continue;
        float q[NQ];
        quantities(minf(maxf(l, -c), c), q);
        for (int k = 0; k < NQ; k++) acc[k] += q[k];
        cnt += 1;
    }
    /* Every sampled token masked (a masked prefix of a short batch): take the first valid
     * token instead, or the sums are shifted by 0 and a variance far below the mean's square
     * is lost to float32 rounding of S2 - S1^2 / n. */
    for (int64_t i = 0; cnt == 0 && mask && i < n; i++) {
        if (!mask[i]) continue;
        float l = load1(ref, i, dtype) - load1(logp, i, dtype);
        if (!(absf(l) <= FLT_BIG)) continue;
        float q[NQ];
        quantities(minf(maxf(l, -c), c), q);
        for (int k = 0; k < NQ; k++) acc[k] += q[k];
        cnt += 1;
    }
    for (int k = 0; k < NQ; k++) shift[k] = cnt > 0 ? (float)(acc[k] / cnt) : 0.f;
}

/* The six quantities of one log-ratio in double, for |l| > 30 (after the clamp), where
 * nothing cancels: k1 = -l, k2 = l^2 / 2, k3 = expm1(l) - l, kl_pq = expm1(l) l - k3,
 * r - 1 = expm1(l), k2 - k3. expm1 overflows double above l ~ 709.78; there the quantities
 * holding e^l are set to +inf (k2 - k3 to -inf) rather than computed, since inf * l - inf
 * would be NaN. Below that, a product may still overflow to +inf, its true value being
 * beyond double too, and no NaN can arise. */
static void exact_quantities(double l, double q[NQ]) {
    const double em1 = expm1(l);
    const double k2 = 0.5 * l * l;
    q[0] = -l;
    q[1] = k2;
    if (em1 <= DBL_MAX) {
        const double k3 = em1 - l;
        q[2] = k3;
        q[3] = em1 * l - k3;
        q[4] = em1;
        q[5] = k2 - k3;
    } else {
        q[2] = q[3] = q[4] = INFINITY;
        q[5] = -INFINITY;
    }
}

/* k3 = e^l - 1 - l of one log-ratio in double: below |l| = 0.1 its series to l^12 (e^l - 1
 * and l cancel there; the first term left out, l^13 / 13!, is below 2e-10 of l^2 / 2 times
 * 1e-12), above expm1(l) - l; inf above l ~ 709.78, where e^l is beyond double. */
static double k3_double(double l) {
    if (l > -0.1 && l < 0.1) {
        double c = 1.0 / 479001600.0;  /* 1 / 12! */
        static const double inv[] = {1.0 / 39916800.0, 1.0 / 3628800.0, 1.0 / 362880.0, 1.0 / 40320.0,
                                     1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5};
        for (int k = 0; k < 10; k++) c = c * l + inv[k];
        return c * l * l;
    }
    const double em1 = expm1(l);
    return em1 <= DBL_MAX ? em1 - l : INFINITY;
}

/* Each of n tokens' k3 in double into out, as the moments count it: 0 where masked out or not
 * usable (non-finite, or l above 700 without a clamp below it), else k3 of l clamped to
 * +-clamp, l being the float difference (as klmonitor.diagnostics.token_k3 takes it). For the
 * few rows a top-sequences table shows token by token. */
void klm_token_k3(const void* logp, const void* ref, int dtype, const uint8_t* mask, int64_t n,
                  float clamp, double* out) {
    const float up = usable_up_to(clamp);
    for (int64_t i = 0; i < n; i++) {
        const float lp = load1(logp, i, dtype), rf = load1(ref, i, dtype);
        const float lf = rf - lp;
        if ((mask && !mask[i]) || !(absf(lf) <= FLT_BIG) || lf > up) {
            out[i] = 0;
            continue;
        }
        double l = lf;
        const double c = clamp;
        l = l > c ? c : (l < -c ? -c : l);
        out[i] = k3_double(l);
    }
}

/* klm_token_k3 over the first cols tokens of each of nrows rows (indices rows[], each in
 * [0, n / row_len)) of [n / row_len, row_len] inputs: out is [nrows, cols]. */
void klm_rows_k3(const void* logp, const void* ref, int dtype, const uint8_t* mask, int64_t row_len,
                 int64_t cols, const int64_t* rows, int64_t nrows, float clamp, double* out) {
    const size_t esize = dtype == KLM_F32 ? 4 : 2;
    for (int64_t k = 0; k < nrows; k++) {
        const int64_t at = rows[k] * row_len;
        klm_token_k3((const char*)logp + at * esize, (const char*)ref + at * esize, dtype,
                     mask ? mask + at : mask, cols, clamp, out + k * cols);
    }
}

/* The (at most) k rows with the largest scores[i] above floor among those with counts[i] > 0,
 * best first, into out (a row beats another of the same score only if it comes first):
 * returns how many. For the top-sequences table: one pass over the row sums, k small. */
int64_t klm_top_rows(const double* scores, const double* counts, int64_t n, int64_t k, double floor,
                     int64_t* out) {
    double best[64];
    int64_t m = 0;
    if (k > 64) k = 64;
    for (int64_t i = 0; i < n; i++) {
        const double x = scores[i];
        if (!(counts[i] > 0) || !(x > floor) || (m == k && !(x > best[m - 1]))) continue;
        int64_t j = m < k ? m++ : m - 1;  /* the slot it may take: a free one or the last */
        while (j > 0 && x > best[j - 1]) {
            best[j] = best[j - 1];
            out[j] = out[j - 1];
            j--;
        }
        best[j] = x;
        out[j] = i;
    }
    return m;
}

/* The top-sequences table of a window (klmonitor.diagnostics.TopSequences) updated with a
 * [nrows, row_len] batch in one call: table is k rows of width = 6 + 2 max_len doubles
 * (score, valid tokens, step, row, rank, kept length, max_len token ids (-1: none or masked
 * out), max_len per-token k3). The batch's rows with a valid token and a score (row_sum) above
 * the table's lowest take part (klm_top_rows); each gets its first keep = min(row_len, max_len)
 * tokens' ids (ids may be NULL) and k3 (klm_token_k3); the table keeps the k best of its rows
 * and theirs, its own first among equal scores (then the batch's, best first). scratch holds
 * 2 k width doubles. Returns the number of the batch's rows that took part (0: table unchanged),
 * -1 (nothing done) where k or max_len is out of range. */
int64_t klm_top_sequences(double* table, int64_t k, int64_t max_len, const double* row_sum,
                          const double* row_count, int64_t nrows, int64_t row_len, const void* logp,
                          const void* ref, int dtype, const uint8_t* mask, const int64_t* ids,
                          float clamp, double step, double rank, double* scratch) {
    if (k < 1 || k > 64 || max_len < 1 || row_len < 1) return -1;
    const int64_t width = 6 + 2 * max_len;
    double floor = INFINITY;
    for (int64_t r = 0; r < k; r++) floor = table[r * width] < floor ? table[r * width] : floor;
    int64_t enter[64];
    const int64_t m = klm_top_rows(row_sum, row_count, nrows, k, floor, enter);
    if (m <= 0) return 0;
    const int64_t keep = row_len < max_len ? row_len : max_len;
    const size_t esize = dtype == KLM_F32 ? 4 : 2;
    double* old = scratch;
    double* fresh = scratch + k * width;
    for (int64_t i = 0; i < k * width; i++) old[i] = table[i];
    for (int64_t j = 0; j < m; j++) {
        const int64_t r = enter[j], at = r * row_len;
        double* row = fresh + j * width;
        row[0] = row_sum[r];
        row[1] = row_count[r];
        row[2] = step;
        row[3] = (double)r;
        row[4] = rank;
        row[5] = (double)keep;
        double* rid = row + 6;
        double* rk3 = row + 6 + max_len;
        for (int64_t t = 0; t < max_len; t++) {
            rid[t] = -1.0;
            rk3[t] = 0.0;
        }
        if (ids) {
            for (int64_t t = 0; t < keep; t++) {
                if (!mask || mask[at + t]) rid[t] = (double)ids[at + t];
            }
        }
        klm_token_k3((const char*)logp + at * esize, (const char*)ref + at * esize, dtype,
                     mask ? mask + at : mask, keep, clamp, rk3);
    }
    /* Merge: the k best of old (its order) then fresh (best first), ties to the earlier. */
    int64_t io = 0, in = 0;
    int64_t order_old[64];
    int64_t no = 0;
    for (int64_t r = 0; r < k; r++) order_old[no++] = r;  /* insertion sort of old by score, stable */
    for (int64_t a = 1; a < no; a++) {
        const int64_t v = order_old[a];
        int64_t b = a;
        while (b > 0 && old[v * width] > old[order_old[b - 1] * width]) {
            order_old[b] = order_old[b - 1];
            b--;
        }
        order_old[b] = v;
    }
    for (int64_t out = 0; out < k; out++) {
        const double* src;
        if (in < m && (io >= no || fresh[in * width] > old[order_old[io] * width])) {
            src = fresh + (in++) * width;
        } else {
            src = old + order_old[io++] * width;
        }
        for (int64_t i = 0; i < width; i++) table[out * width + i] = src[i];
    }
    return m;
}

/* ---- Diagnostics in the same pass (klm_fold_diag) ----------------------------------------
 * Per-token k3 is computed by the bodies anyway; with diagnostics on, each block's k3 (0 for a
 * token outside the float sums) and weights (1 for a token in them) are kept in the block's
 * buffers, which stay in L1, and after the block:
 *  - per row of a [B, T] batch: its k3 sum and valid tokens (top_sequences),
 *  - per position bucket (0-1, 2-3, 4-7, ..., the last open: floor(log2(max(pos, 1))) capped
 *    at buckets - 1, as PositionProfile): k3 sum and valid tokens (by_position, every row),
 *  - per token id (top_tokens): k3 sum and count into a float64 table of the vocabulary; valid
 *    tokens with an id outside [0, vocab) are counted apart.
 * Tokens the rescan adds in double (|l| > 30 above a clamp of 30) add their double k3 and a
 * count of 1 (diag_token). Sums are float64 over the float k3 of each token. */
#define KLM_MAX_BUCKETS 64

/* What klm_fold_diag writes (a ctypes Structure mirrors it in __init__.py). Every output is
 * added to, never overwritten; a NULL pointer (or 0 size) turns its part off. */
typedef struct {
    int64_t row_len;       /* T of a [B, T] batch; 0: no rows (row sums and buckets off) */
    double* row_sum;       /* [n / T]: k3 sum per row */
    double* row_count;     /* [n / T]: valid tokens per row */
    int64_t buckets;       /* position buckets, 0 (off) to KLM_MAX_BUCKETS */
    double* bucket_sum;    /* [buckets] */
    double* bucket_count;  /* [buckets] */
    const int64_t* ids;    /* [n] token ids; NULL: no token table */
    int64_t vocab;         /* ids in [0, vocab) have a slot */
    double* token_sum;     /* [vocab] */
    double* token_count;   /* [vocab] */
    double* outside;       /* [1]: valid tokens whose id is outside [0, vocab) */
    double* scratch;       /* the threads' token tables: scratch_tables x [vocab][2] doubles, all 0
                            * on entry and left 0 (NULL: allocated per call) */
    int64_t scratch_tables;
    double* entropy;       /* [3]: count, mean and M2 of -log q (q: logp) over the masked-in tokens
                            * with both log-probs finite, merged into (Chan); NULL: off */
} klm_diag;

/* One thread's share: rows its range shares with a neighbour's (the first and last row it
 * touches) and the buckets are summed privately and added once the threads are done; rows in
 * between go straight to the output. Each thread scatters into its own interleaved token
 * table tab ([2 id]: k3 sum, [2 id + 1]: count; one cache line per token instead of two),
 * which the threads then add into the output's two arrays, each a slice of the vocabulary,
 * tables in thread order (the same sums every run), zeroing them as they go. */
typedef struct {
    const klm_diag* d;
    int64_t first_row, last_row;
    double edge_sum[2], edge_count[2];
    double bsum[KLM_MAX_BUCKETS], bcount[KLM_MAX_BUCKETS];
    double* tab;
    double outside;
    float ent_shift;  /* the entropy sums are of logp - ent_shift (all threads the same) */
    double ent[3];    /* count, sum and sum of squares of logp - ent_shift */
} diag_part;

static inline int64_t bucket_of(int64_t pos, int64_t buckets) {
    int64_t b = pos < 2 ? 0 : 63 - __builtin_clzll((unsigned long long)pos);
    return b < buckets - 1 ? b : buckets - 1;
}

static inline void diag_row_add(diag_part* p, int64_t row, double s, double c) {
    if (!p->d->row_sum) return;
    if (row == p->first_row) {
        p->edge_sum[0] += s; p->edge_count[0] += c;
    } else if (row == p->last_row) {
        p->edge_sum[1] += s; p->edge_count[1] += c;
    } else {
        p->d->row_sum[row] += s; p->d->row_count[row] += c;
    }
}

/* One token of k3 (double) and count 1, at global index i (a token the rescan added). */
static void diag_token(diag_part* p, int64_t i, double k3) {
    const klm_diag* d = p->d;
    if (d->row_len > 0) {
        const int64_t row = i / d->row_len, pos = i - row * d->row_len;
        diag_row_add(p, row, k3, 1.0);
        if (d->buckets > 0) {
            const int64_t b = bucket_of(pos, d->buckets);
            p->bsum[b] += k3; p->bcount[b] += 1.0;
        }
    }
    if (d->ids) {
        const int64_t id = d->ids[i];
        if ((uint64_t)id < (uint64_t)d->vocab) {
            p->tab[2 * id] += k3; p->tab[2 * id + 1] += 1.0;
        } else {
            p->outside += 1.0;
        }
    }
}

/* The k3 sum (double) and weight sum of bk[0, len), bw[0, len) (len <= BLOCK): four
 * independent double lanes, so the adds are not one chain of dependent float64 additions
 * (latency-bound: that chain cost as much as the moments); the weights (0 or 1) sum
 * exactly in float. */
static inline void seg_sums(const float* bk, const float* bw, int len, double* s, double* c) {
    double a0 = 0, a1 = 0, a2 = 0, a3 = 0;
    float w0 = 0, w1 = 0, w2 = 0, w3 = 0;
    int j = 0;
    for (; j + 4 <= len; j += 4) {
        a0 += bk[j]; a1 += bk[j + 1]; a2 += bk[j + 2]; a3 += bk[j + 3];
        w0 += bw[j]; w1 += bw[j + 1]; w2 += bw[j + 2]; w3 += bw[j + 3];
    }
    for (; j < len; j++) {
        a0 += bk[j];
        w0 += bw[j];
    }
    *s = (a0 + a1) + (a2 + a3);
    *c = (double)((w0 + w1) + (w2 + w3));
}

/* The block of nb tokens at global index g0: k3 in bk, weights (1 or 0) in bw. SEG_SUMS sums
 * one segment (a bucket of a row); the token table gets k3 and weight per token id, in the
 * thread's interleaved table tab ([2 id] sum, [2 id + 1] count: one cache line per token). */
#define DIAG_BLOCK_BODY(SEG_SUMS)                                                              \
    const klm_diag* d = p->d;                                                                  \
    const int64_t T = d->row_len;                                                              \
    if (T > 0 && (d->row_sum || d->buckets > 0)) {                                             \
        int64_t row = g0 / T, pos = g0 - row * T;                                              \
        int k = 0;                                                                             \
        while (k < nb) {                                                                       \
            int64_t b = 0, stop = T; /* this segment: one bucket of one row */                 \
            if (d->buckets > 0) {                                                              \
                b = bucket_of(pos, d->buckets);                                                \
                if (b < d->buckets - 1 && ((int64_t)2 << b) < T) stop = (int64_t)2 << b;       \
            }                                                                                  \
            int len = (int)(stop - pos < nb - k ? stop - pos : nb - k);                        \
            double s, c;                                                                       \
            SEG_SUMS(bk + k, bw + k, len, &s, &c);                                             \
            diag_row_add(p, row, s, c);                                                        \
            if (d->buckets > 0) {                                                              \
                p->bsum[b] += s; p->bcount[b] += c;                                            \
            }                                                                                  \
            k += len;                                                                          \
            pos += len;                                                                        \
            if (pos == T) {                                                                    \
                row++;                                                                         \
                pos = 0;                                                                       \
            }                                                                                  \
        }                                                                                      \
    }                                                                                          \
    if (d->ids) {                                                                              \
        const int64_t* ids = d->ids + g0;                                                      \
        const uint64_t V = (uint64_t)d->vocab;                                                 \
        double* tab = p->tab;                                                                  \
        double out = 0;                                                                        \
        for (int j = 0; j < nb; j++) {                                                         \
            const int64_t id = ids[j];                                                         \
            if ((uint64_t)id < V) {                                                            \
                tab[2 * id] += bk[j];                                                          \
                tab[2 * id + 1] += bw[j];                                                      \
            } else {                                                                           \
                out += bw[j];                                                                  \
            }                                                                                  \
        }                                                                                      \
        p->outside += out;                                                                     \
    }

static void diag_block(diag_part* p, int64_t g0, int nb, const float* bk, const float* bw) {
    DIAG_BLOCK_BODY(seg_sums)
}

/* Token i of a block being scanned again, unless masked out: if its |l| is finite and above
 * threshold, it is counted in out[14] (extreme); if the clamp exceeds 30 and its |l| does
 * too (the float body gave it weight 0), its six quantities are computed in double from
 * l = (double)ref - (double)logp clamped to +-clamp, and added to the shifted sums out[0..11]
 * and the count out[12]. The float l, as the float body computes it, decides both, so every
 * valid finite token lands in exactly one of the two bodies. Returns 1 for a token added. */
static int rescan_token(const void* logp, const void* ref, int dtype, const uint8_t* mask,
                        int64_t i, const float* shift, float clamp, float threshold, double* out,
                        diag_part* dp, int64_t off) {
    if (mask && !mask[i]) return 0;
    const float lp = load1(logp, i, dtype), rf = load1(ref, i, dtype);
    const float al = absf(rf - lp);
    if (!(al <= FLT_BIG) || rf - lp > usable_up_to(clamp)) return 0;  /* non-finite */
    if (al > threshold) out[14] += 1;
    if (!(clamp > FLOAT_UP_TO && al > FLOAT_UP_TO)) return 0;
    const double c = clamp;
    double l = (double)rf - (double)lp;
    l = l > c ? c : (l < -c ? -c : l);
    double q[NQ];
    exact_quantities(l, q);
    for (int k = 0; k < NQ; k++) {
        const double d = q[k] - (double)shift[k];
        out[k] += d;
        out[NQ + k] += d * d;
    }
    out[12] += 1;
    if (dp) diag_token(dp, off + i, q[2]);
    return 1;
}

/* Every token of [lo, hi) through rescan_token (the portable body's rescan). */
static void rescan_block(const void* logp, const void* ref, int dtype, const uint8_t* mask,
                         int64_t lo, int64_t hi, const float* shift, float clamp, float threshold,
                         double* out, diag_part* dp, int64_t off) {
    for (int64_t i = lo; i < hi; i++)
        rescan_token(logp, ref, dtype, mask, i, shift, clamp, threshold, out, dp, off);
}

/* One block of at most BLOCK tokens, accumulated in float (exact for the counts; for the
 * shifted sums, at most ~BLOCK/8 additions per vector lane, a relative error far below the
 * statistics' own), then added to the double totals: float lanes are twice as wide as double
 * ones, and this loop is bound by arithmetic, not memory. The squares of k2 - k3, which is of
 * order l^3 and so underflows float's normal range for |l| below ~3e-7, are summed in double;
 * the other squares leave float's normal range only for variances below ~1e-38.
 * A token is in the float sums where it is valid (masked in, finite) and |l| <= bound; the
 * block's max |l| runs over every valid token. */
#define BLOCK 512
#define BODY(MASK_EXPR, STORE)                                                                  \
    for (int64_t i = blo; i < bhi; i++) {                                                 \
        float l = ref[i] - logp[i];                                                       \
        float m = (MASK_EXPR);                                                            \
        float al = absf(l);                                                               \
        int finite = al <= FLT_BIG && l <= up;  /* false for +-inf, NaN, l > 700 */       \
        float g = al <= bound ? m : 0.f;  /* bound <= FLT_BIG: finite too */              \
        float lz = g > 0.f ? l : 0.f;                                                     \
        float av = finite ? al * m : 0.f;                                                 \
        float q[NQ];                                                                      \
        quantities(minf(maxf(lz, -clamp), clamp), q);                                     \
        float d0 = (q[0] - s0) * g, d1 = (q[1] - s1) * g, d2 = (q[2] - s2) * g;           \
        float d3 = (q[3] - s3) * g, d4 = (q[4] - s4) * g, d5 = (q[5] - s5) * g;           \
        fa0 += d0; fb0 += d0 * d0;                                                        \
        fa1 += d1; fb1 += d1 * d1;                                                        \
        fa2 += d2; fb2 += d2 * d2;                                                        \
        fa3 += d3; fb3 += d3 * d3;                                                        \
        fa4 += d4; fb4 += d4 * d4;                                                        \
        fa5 += d5; fb5 += (double)d5 * d5;                                                \
        fcnt += g;                                                                        \
        fnonfinite += finite ? 0.f : m;                                                   \
        int32_t bits = float_bits(av);                                                    \
        bmax = bmax > bits ? bmax : bits;                                                 \
        STORE;                                                                            \
    }

/* Shifted sums over float32 tokens [lo, hi) (see BODY and rescan_token): the portable body,
 * compiled for the baseline target. out as klm_token_moments writes it. */
static void range_float_blocks(const float* restrict logp, const float* restrict ref,
                               const uint8_t* restrict mask, int64_t lo, int64_t hi,
                               const float* shift, float clamp, float threshold, double* out,
                               diag_part* dp, int64_t off) {
    float bk[BLOCK], bw[BLOCK];  /* with dp: the block's k3 and weights (see diag_block) */
    const float es = dp ? dp->ent_shift : 0.f;
    const float s0 = shift[0], s1 = shift[1], s2 = shift[2];
    const float s3 = shift[3], s4 = shift[4], s5 = shift[5];
    const float bound = float_bound(clamp), up = usable_up_to(clamp);
    const int32_t rbits = float_bits(rescan_bound(clamp, threshold));
    double acc[NOUT] = {0};
    int32_t maxbits = 0;
    for (int64_t blo = lo; blo < hi; blo += BLOCK) {
        int64_t bhi = blo + BLOCK < hi ? blo + BLOCK : hi;
        float fa0 = 0, fa1 = 0, fa2 = 0, fa3 = 0, fa4 = 0, fa5 = 0;
        float fb0 = 0, fb1 = 0, fb2 = 0, fb3 = 0, fb4 = 0;
        double fb5 = 0;
        float fcnt = 0, fnonfinite = 0;
        float fe0 = 0, fe1 = 0, fe2 = 0, ew, ex;  /* with dp: the entropy's block sums */
        int32_t bmax = 0;
#define KEEP                                                                              \
    (bk[i - blo] = q[2], bw[i - blo] = g, ew = al <= FLT_BIG ? m : 0.f,                        \
     ex = ew > 0.f ? logp[i] - es : 0.f, fe0 += ew, fe1 += ex, fe2 += ex * ex)
        if (dp) {
            if (mask) {
                BODY((float)(mask[i] != 0), KEEP)
            } else {
                BODY(1.f, KEEP)
            }
            diag_block(dp, off + blo, (int)(bhi - blo), bk, bw);
            dp->ent[0] += fe0; dp->ent[1] += fe1; dp->ent[2] += fe2;
        } else if (mask) {
            BODY((float)(mask[i] != 0), (void)0)
        } else {
            BODY(1.f, (void)0)
        }
#undef KEEP
        acc[0] += fa0; acc[1] += fa1; acc[2] += fa2; acc[3] += fa3; acc[4] += fa4; acc[5] += fa5;
        acc[6] += fb0; acc[7] += fb1; acc[8] += fb2; acc[9] += fb3; acc[10] += fb4; acc[11] += fb5;
        acc[12] += fcnt; acc[13] += fnonfinite;
        if (bmax > rbits) {  /* some valid |l| above the threshold or 30: rare */
            rescan_block(logp, ref, KLM_F32, mask, blo, bhi, shift, clamp, threshold, acc, dp, off);
        }
        maxbits = maxbits > bmax ? maxbits : bmax;
    }
    for (int k = 0; k < NOUT - 1; k++) out[k] = acc[k];
    union { int32_t i; float f; } mx;
    mx.i = maxbits;
    out[NOUT - 1] = mx.f;
}

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#include <cpuid.h>
#include <immintrin.h>
#define KLM_X86 1
/* Functions that may execute AVX2, FMA or F16C instructions. The rest of the file is compiled
 * for the baseline target, and these run only once klm_select_isa has seen, with cpuid and
 * xgetbv, that the CPU has the three and the OS saves the 256-bit registers. */
#define KLM_AVX2_FN __attribute__((target("avx2,fma,f16c")))

/* 1 where the AVX2 body may run on this CPU: AVX2, FMA and F16C present and YMM state
 * enabled by the OS (a hypervisor or kernel may disable AVX that the CPU has). */
static int cpu_has_avx2(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    const unsigned need1 = bit_FMA | bit_OSXSAVE | bit_AVX | bit_F16C;
    if ((c & need1) != need1) return 0;
    unsigned xlo, xhi;
    __asm__ volatile("xgetbv" : "=a"(xlo), "=d"(xhi) : "c"(0));
    (void)xhi;
    if ((xlo & 6u) != 6u) return 0;  /* XMM and YMM state */
    if (__get_cpuid_max(0, 0) < 7) return 0;
    __cpuid_count(7, 0, a, b, c, d);
    return (b & bit_AVX2) != 0;
}

/* Eight inputs as float32: bf16 widened by a shift, fp16 by F16C's converter. */
static inline __attribute__((always_inline)) KLM_AVX2_FN __m256 avx2_load8(const void* p, int64_t i, int dtype) {
    if (dtype == KLM_BF16) {
        __m128i h = _mm_loadu_si128((const __m128i*)((const uint16_t*)p + i));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    if (dtype == KLM_F16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)((const uint16_t*)p + i)));
    return _mm256_loadu_ps((const float*)p + i);
}

/* Pass 1 over one block (length a multiple of 8): validate, clamp, sum k1 and the counts;
 * the clamped log-ratio and the token's weight go to the buffers for pass 2. A token's weight
 * is 1 where it is valid and |l| <= bound (see float_bound); the max |l| runs over every
 * valid token. has_mask and dtype are constants at each call, so each combination compiles
 * to its own loop. */
static inline __attribute__((always_inline)) KLM_AVX2_FN void avx2_pass1(
    const void* restrict logp, const void* restrict ref, const uint8_t* restrict mask,
    int64_t blo, int nb, float clamp, float bound, float s0, float* restrict bl, float* restrict bg,
    __m256* fa0, __m256* fb0, __m256* fcnt, __m256i* msum, __m256i* bmax, int has_mask,
    int dtype, __m256* ent, float ent_shift, int has_ent) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256 big = _mm256_set1_ps(FLT_BIG), one = _mm256_set1_ps(1.f);
    const __m256 bnd = _mm256_set1_ps(bound), up = _mm256_set1_ps(usable_up_to(clamp));
    const __m256 hi = _mm256_set1_ps(clamp), lo = _mm256_set1_ps(-clamp);
    const __m256 vs0 = _mm256_set1_ps(s0);
    const __m256i zero = _mm256_setzero_si256();
    __m256 a0 = *fa0, b0 = *fb0, cnt = *fcnt;
    __m256i ms = *msum, mx = *bmax;
    const __m256 ves = _mm256_set1_ps(ent_shift);
    __m256 e0 = _mm256_setzero_ps(), e1 = e0, e2 = e0;
    if (has_ent) {
        e0 = ent[0]; e1 = ent[1]; e2 = ent[2];
    }
    for (int j = 0; j < nb; j += 8) {
        const int64_t i = blo + j;
        const __m256 lpv = avx2_load8(logp, i, dtype);
        __m256 l = _mm256_sub_ps(avx2_load8(ref, i, dtype), lpv);
        __m256 al = _mm256_and_ps(l, absmask);
        __m256 fm = _mm256_cmp_ps(al, big, _CMP_LE_OQ);  /* both log-probs finite */
        __m256 fin = _mm256_and_ps(_mm256_cmp_ps(al, big, _CMP_LE_OQ),  /* finite, */
                                   _mm256_cmp_ps(l, up, _CMP_LE_OQ));   /* l <= 700 */
        __m256 v = _mm256_cmp_ps(al, bnd, _CMP_LE_OQ);    /* in the float sums */
        if (has_mask) {
            __m256i w = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(mask + i)));
            __m256i m = _mm256_cmpgt_epi32(w, zero);
            ms = _mm256_sub_epi32(ms, m);
            fin = _mm256_and_ps(fin, _mm256_castsi256_ps(m));
            v = _mm256_and_ps(v, _mm256_castsi256_ps(m));
            fm = _mm256_and_ps(fm, _mm256_castsi256_ps(m));
        }
        if (has_ent) {  /* logp - shift where masked in and finite, else 0 (never inf * 0) */
            const __m256 ex = _mm256_and_ps(fm, _mm256_sub_ps(lpv, ves));
            e0 = _mm256_add_ps(e0, _mm256_and_ps(fm, one));
            e1 = _mm256_add_ps(e1, ex);
            e2 = _mm256_fmadd_ps(ex, ex, e2);
        }
        __m256 g = _mm256_and_ps(v, one);
        __m256 lz = _mm256_and_ps(v, l);
        mx = _mm256_max_epi32(mx, _mm256_castps_si256(_mm256_and_ps(al, fin)));
        __m256 lc = _mm256_min_ps(_mm256_max_ps(lz, lo), hi);
        _mm256_store_ps(bl + j, lc);
        _mm256_store_ps(bg + j, g);
        __m256 d0 = _mm256_fnmsub_ps(vs0, g, lc);  /* -lc - s0 g */
        a0 = _mm256_add_ps(a0, d0);
        b0 = _mm256_fmadd_ps(d0, d0, b0);
        cnt = _mm256_add_ps(cnt, g);
    }
    *fa0 = a0; *fb0 = b0; *fcnt = cnt; *msum = ms; *bmax = mx;
    if (has_ent) {
        ent[0] = e0; ent[1] = e1; ent[2] = e2;
    }
}

static inline KLM_AVX2_FN float avx2_hsum8(__m256 x) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
static inline KLM_AVX2_FN double avx2_hsum4d(__m256d x) {
    __m128d s = _mm_add_pd(_mm256_castpd256_pd128(x), _mm256_extractf128_pd(x, 1));
    return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}
static inline KLM_AVX2_FN int32_t avx2_hmax8i(__m256i x) {
    __m128i s = _mm_max_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
    s = _mm_max_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_max_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}


/* rescan_token over the tokens of [blo, blo + nb) (nb a multiple of 8) whose |l| exceeds
 * rb, found eight at a time; the others need nothing. Returns the number of tokens added to
 * the double sums. */
static KLM_AVX2_FN int avx2_rescan(const void* logp, const void* ref, int dtype, const uint8_t* mask,
                                   int64_t blo, int nb, float rb, const float* shift, float clamp,
                                   float threshold, double* out, diag_part* dp) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256 vrb = _mm256_set1_ps(rb);
    int added = 0;
    for (int j = 0; j < nb; j += 8) {
        __m256 l = _mm256_sub_ps(avx2_load8(ref, blo + j, dtype), avx2_load8(logp, blo + j, dtype));
        unsigned far = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_and_ps(l, absmask), vrb, _CMP_GT_OQ));
        while (far) {
            int k = __builtin_ctz(far);
            far &= far - 1;
            added += rescan_token(logp, ref, dtype, mask, blo + j + k, shift, clamp, threshold, out, dp, 0);
        }
    }
    return added;
}

/* k2, k3, kl_pq, r - 1 and k2 - k3 of eight clamped log-ratios (see quantities()); with
 * small_only, every |lc| is below 0.34, so n = 0 and the range reduction is skipped. */
static inline __attribute__((always_inline)) KLM_AVX2_FN void avx2_quantities(
    __m256 lc, int small_only, __m256* k2o, __m256* k3o, __m256* klo, __m256* em1o, __m256* q5o) {
    const __m256 zero = _mm256_setzero_ps(), half = _mm256_set1_ps(0.5f);
    __m256 r = lc, n = zero, small = zero;
    if (!small_only) {
        n = _mm256_floor_ps(_mm256_fmadd_ps(lc, _mm256_set1_ps(1.44269504088896341f), half));
        r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), lc);
        r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
        small = _mm256_cmp_ps(n, zero, _CMP_EQ_OQ);
    }
    __m256 r2 = _mm256_mul_ps(r, r);
    /* Estrin: c = (c0 + c1 r) + r^2 (c2 + c3 r) + r^4 ((c4 + c5 r) + r^2 c6) */
    __m256 p01 = _mm256_fmadd_ps(_mm256_set1_ps(1.f / 24.f), r, _mm256_set1_ps(1.f / 6.f));
    __m256 p23 = _mm256_fmadd_ps(_mm256_set1_ps(1.f / 720.f), r, _mm256_set1_ps(1.f / 120.f));
    __m256 p45 = _mm256_fmadd_ps(_mm256_set1_ps(1.f / 40320.f), r, _mm256_set1_ps(1.f / 5040.f));
    __m256 p46 = _mm256_fmadd_ps(_mm256_set1_ps(1.f / 362880.f), r2, p45);
    __m256 r4 = _mm256_mul_ps(r2, r2);
    __m256 c = _mm256_fmadd_ps(p23, r2, p01);
    c = _mm256_fmadd_ps(p46, r4, c);
    __m256 rc = _mm256_mul_ps(r, c);
    __m256 k3r = _mm256_mul_ps(r2, _mm256_add_ps(rc, half));
    __m256 e = _mm256_add_ps(r, k3r);
    __m256 k2 = _mm256_mul_ps(_mm256_mul_ps(lc, half), lc);
    __m256 q5s = _mm256_fnmadd_ps(r2, rc, zero);
    __m256 em1 = e, k3 = k3r, q5 = q5s;
    if (!small_only) {
        __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23));
        em1 = _mm256_fmadd_ps(scale, e, _mm256_sub_ps(scale, _mm256_set1_ps(1.f)));
        em1 = _mm256_blendv_ps(em1, e, small);
        k3 = _mm256_blendv_ps(_mm256_sub_ps(em1, lc), k3r, small);
        q5 = _mm256_blendv_ps(_mm256_sub_ps(k2, _mm256_max_ps(k3, zero)), q5s, small);
    }
    k3 = _mm256_max_ps(k3, zero);
    *k2o = k2; *k3o = k3; *em1o = em1;
    *klo = _mm256_max_ps(_mm256_fmsub_ps(em1, lc, k3), zero);
    *q5o = q5;
}

/* seg_sums with AVX2: sixteen k3 at a time widened to four double vectors (four independent
 * chains: the adds' latency, not their throughput, bounds one chain), the weights in float. */
static inline __attribute__((always_inline)) KLM_AVX2_FN void seg_sums_avx2(
    const float* bk, const float* bw, int len, double* s, double* c) {
    __m256d a0 = _mm256_setzero_pd(), a1 = _mm256_setzero_pd();
    __m256d a2 = _mm256_setzero_pd(), a3 = _mm256_setzero_pd();
    __m256 w0 = _mm256_setzero_ps(), w1 = _mm256_setzero_ps();
    int j = 0;
    for (; j + 16 <= len; j += 16) {
        __m256 k = _mm256_loadu_ps(bk + j), k8 = _mm256_loadu_ps(bk + j + 8);
        a0 = _mm256_add_pd(a0, _mm256_cvtps_pd(_mm256_castps256_ps128(k)));
        a1 = _mm256_add_pd(a1, _mm256_cvtps_pd(_mm256_extractf128_ps(k, 1)));
        a2 = _mm256_add_pd(a2, _mm256_cvtps_pd(_mm256_castps256_ps128(k8)));
        a3 = _mm256_add_pd(a3, _mm256_cvtps_pd(_mm256_extractf128_ps(k8, 1)));
        w0 = _mm256_add_ps(w0, _mm256_loadu_ps(bw + j));
        w1 = _mm256_add_ps(w1, _mm256_loadu_ps(bw + j + 8));
    }
    if (j + 8 <= len) {
        __m256 k = _mm256_loadu_ps(bk + j);
        a0 = _mm256_add_pd(a0, _mm256_cvtps_pd(_mm256_castps256_ps128(k)));
        a1 = _mm256_add_pd(a1, _mm256_cvtps_pd(_mm256_extractf128_ps(k, 1)));
        w0 = _mm256_add_ps(w0, _mm256_loadu_ps(bw + j));
        j += 8;
    }
    double st = 0;
    float ct = 0;
    for (; j < len; j++) {
        st += bk[j];
        ct += bw[j];
    }
    *s = avx2_hsum4d(_mm256_add_pd(_mm256_add_pd(a0, a1), _mm256_add_pd(a2, a3))) + st;
    *c = (double)(avx2_hsum8(_mm256_add_ps(w0, w1)) + ct);
}

static KLM_AVX2_FN void diag_block_avx2(diag_part* p, int64_t g0, int nb, const float* bk, const float* bw) {
    DIAG_BLOCK_BODY(seg_sums_avx2)
}

/* The AVX2 form of range_float_blocks over [lo, hi) with hi - lo a multiple of 8. */
static KLM_AVX2_FN void range_avx2(const void* restrict logp, const void* restrict ref, int dtype,
                       const uint8_t* restrict mask, int64_t lo, int64_t hi,
                       const float* shift, float clamp, float threshold, double* out, diag_part* dp) {
    float bl[BLOCK] __attribute__((aligned(32)));
    float bg[BLOCK] __attribute__((aligned(32)));
    const __m256 vs1 = _mm256_set1_ps(shift[1]), vs2 = _mm256_set1_ps(shift[2]);
    const __m256 vs3 = _mm256_set1_ps(shift[3]), vs4 = _mm256_set1_ps(shift[4]);
    const __m256 vs5 = _mm256_set1_ps(shift[5]);
    const __m256 zero = _mm256_setzero_ps();
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256 thr = _mm256_set1_ps(0.34f);
    const float bound = float_bound(clamp), rb = rescan_bound(clamp, threshold);
    const int32_t rbits = float_bits(rb);
    const int has_ent = dp && dp->d->entropy;
    const float es = dp ? dp->ent_shift : 0.f;
    double acc[NOUT] = {0};
    int32_t maxbits = 0;
    for (int64_t blo = lo; blo < hi; blo += BLOCK) {
        const int nb = (int)(hi - blo < BLOCK ? hi - blo : BLOCK);
        __m256 fa0 = zero, fb0 = zero, fcnt = zero;
        __m256i msum = _mm256_setzero_si256(), bmax = _mm256_setzero_si256();
        __m256 ent[3] = {zero, zero, zero};  /* with the entropy: its block sums */
#define PASS1(HAS_MASK, DTYPE, ENT)                                                                \
    avx2_pass1(logp, ref, mask, blo, nb, clamp, bound, shift[0], bl, bg, &fa0, &fb0, &fcnt, &msum, \
               &bmax, HAS_MASK, DTYPE, ent, es, ENT)
#define PASS1_ENT(HAS_MASK, DTYPE)                                                                 \
    do {                                                                                           \
        if (has_ent) PASS1(HAS_MASK, DTYPE, 1); else PASS1(HAS_MASK, DTYPE, 0);                    \
    } while (0)
        if (dtype == KLM_BF16) {
            if (mask) PASS1_ENT(1, KLM_BF16); else PASS1_ENT(0, KLM_BF16);
        } else if (dtype == KLM_F16) {
            if (mask) PASS1_ENT(1, KLM_F16); else PASS1_ENT(0, KLM_F16);
        } else {
            if (mask) PASS1_ENT(1, KLM_F32); else PASS1_ENT(0, KLM_F32);
        }
#undef PASS1_ENT
#undef PASS1
        if (has_ent) {
            dp->ent[0] += avx2_hsum8(ent[0]);
            dp->ent[1] += avx2_hsum8(ent[1]);
            dp->ent[2] += avx2_hsum8(ent[2]);
        }
        __m256 fa1 = zero, fa2 = zero, fa3 = zero, fa4 = zero, fa5 = zero;
        __m256 fb1 = zero, fb2 = zero, fb3 = zero, fb4 = zero;
        __m256d fb5lo = _mm256_setzero_pd(), fb5hi = _mm256_setzero_pd();
        for (int j = 0; j < nb; j += 8) {
            __m256 lc = _mm256_load_ps(bl + j), g = _mm256_load_ps(bg + j);
            __m256 k2, k3, kl, em1, q5;
            __m256 far = _mm256_cmp_ps(_mm256_and_ps(lc, absmask), thr, _CMP_GT_OQ);
            if (_mm256_testz_ps(far, far)) {
                avx2_quantities(lc, 1, &k2, &k3, &kl, &em1, &q5);
            } else {
                avx2_quantities(lc, 0, &k2, &k3, &kl, &em1, &q5);
            }
            if (dp) _mm256_store_ps(bl + j, k3);  /* lc is read: bl keeps the block's k3 */
            __m256 d1 = _mm256_fnmadd_ps(vs1, g, k2), d2 = _mm256_fnmadd_ps(vs2, g, k3);
            __m256 d3 = _mm256_fnmadd_ps(vs3, g, kl), d4 = _mm256_fnmadd_ps(vs4, g, em1);
            __m256 d5 = _mm256_fnmadd_ps(vs5, g, q5);
            fa1 = _mm256_add_ps(fa1, d1); fb1 = _mm256_fmadd_ps(d1, d1, fb1);
            fa2 = _mm256_add_ps(fa2, d2); fb2 = _mm256_fmadd_ps(d2, d2, fb2);
            fa3 = _mm256_add_ps(fa3, d3); fb3 = _mm256_fmadd_ps(d3, d3, fb3);
            fa4 = _mm256_add_ps(fa4, d4); fb4 = _mm256_fmadd_ps(d4, d4, fb4);
            fa5 = _mm256_add_ps(fa5, d5);
            __m256d e5lo = _mm256_cvtps_pd(_mm256_castps256_ps128(d5));
            __m256d e5hi = _mm256_cvtps_pd(_mm256_extractf128_ps(d5, 1));
            fb5lo = _mm256_fmadd_pd(e5lo, e5lo, fb5lo);
            fb5hi = _mm256_fmadd_pd(e5hi, e5hi, fb5hi);
        }
        acc[0] += avx2_hsum8(fa0); acc[1] += avx2_hsum8(fa1); acc[2] += avx2_hsum8(fa2);
        acc[3] += avx2_hsum8(fa3); acc[4] += avx2_hsum8(fa4); acc[5] += avx2_hsum8(fa5);
        acc[6] += avx2_hsum8(fb0); acc[7] += avx2_hsum8(fb1); acc[8] += avx2_hsum8(fb2);
        acc[9] += avx2_hsum8(fb3); acc[10] += avx2_hsum8(fb4); acc[11] += avx2_hsum4d(_mm256_add_pd(fb5lo, fb5hi));
        float cnt = avx2_hsum8(fcnt);
        acc[12] += cnt;
        if (dp) diag_block_avx2(dp, blo, nb, bl, bg);
        int32_t bm = avx2_hmax8i(bmax);
        int added = 0;  /* tokens the rescan added in double */
        if (bm > rbits) {  /* some valid |l| above the threshold or 30: rare */
            added = avx2_rescan(logp, ref, dtype, mask, blo, nb, rb, shift, clamp, threshold, acc, dp);
        }
        /* Non-finite tokens: those masked in, less the valid ones (in either sum). */
        if (mask) {
            int32_t lanes[8];
            _mm256_storeu_si256((__m256i*)lanes, msum);
            int32_t masked_in = 0;
            for (int k = 0; k < 8; k++) masked_in += lanes[k];
            acc[13] += (double)masked_in - cnt - added;
        } else {
            acc[13] += nb - cnt - added;
        }
        maxbits = maxbits > bm ? maxbits : bm;
    }
    for (int k = 0; k < NOUT - 1; k++) out[k] = acc[k];
    union { int32_t i; float f; } mxu;
    mxu.i = maxbits;
    out[15] = mxu.f;
}

/* ratio_range over [lo, hi) eight tokens at a time (hi - lo a multiple of 8): lanes of min l,
 * max l (+-inf in a lane that saw no usable token) and of counts of |l| > ln 2, in int32
 * lanes added to the int64 count every 2^20 vectors (no lane overflows). */
static KLM_AVX2_FN void ratio_range_avx2(const void* logp, const void* ref, int dtype, const uint8_t* mask,
                                         int64_t lo, int64_t hi, float* mn, float* mx, int64_t* cnt) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256 big = _mm256_set1_ps(FLT_BIG), ln2 = _mm256_set1_ps(KLM_LN2F);
    const __m256 pinf = _mm256_set1_ps(__builtin_inff()), ninf = _mm256_set1_ps(-__builtin_inff());
    const __m256i zero = _mm256_setzero_si256();
    __m256 vmin = pinf, vmax = ninf;
    int64_t total = 0;
    for (int64_t start = lo; start < hi; start += (int64_t)8 << 20) {
        const int64_t stop = hi - start < ((int64_t)8 << 20) ? hi : start + ((int64_t)8 << 20);
        __m256i vc = zero;
        for (int64_t i = start; i < stop; i += 8) {
            const __m256 l = _mm256_sub_ps(avx2_load8(ref, i, dtype), avx2_load8(logp, i, dtype));
            const __m256 al = _mm256_and_ps(l, absmask);
            __m256 ok = _mm256_cmp_ps(al, big, _CMP_LE_OQ);  /* finite (NaN compares false) */
            if (mask) {
                __m256i m = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(mask + i)));
                ok = _mm256_and_ps(ok, _mm256_castsi256_ps(_mm256_cmpgt_epi32(m, zero)));
            }
            vmin = _mm256_min_ps(vmin, _mm256_blendv_ps(pinf, l, ok));
            vmax = _mm256_max_ps(vmax, _mm256_blendv_ps(ninf, l, ok));
            const __m256 out = _mm256_and_ps(ok, _mm256_cmp_ps(al, ln2, _CMP_GT_OQ));
            vc = _mm256_sub_epi32(vc, _mm256_castps_si256(out));  /* lanes of -1 where counted */
        }
        int32_t lanes[8];
        _mm256_storeu_si256((__m256i*)lanes, vc);
        for (int k = 0; k < 8; k++) total += lanes[k];
    }
    float a[8], b[8];
    _mm256_storeu_ps(a, vmin);
    _mm256_storeu_ps(b, vmax);
    for (int k = 0; k < 8; k++) {
        *mn = a[k] < *mn ? a[k] : *mn;
        *mx = b[k] > *mx ? b[k] : *mx;
    }
    *cnt += total;
}
#endif

/* Add the shifted sums of another range of tokens (same shift) into out: sums and counts
 * add, max|l| takes the larger. */
static inline void add_sums(double* out, const double* other) {
    for (int k = 0; k < NOUT - 1; k++) out[k] += other[k];
    out[NOUT - 1] = other[NOUT - 1] > out[NOUT - 1] ? other[NOUT - 1] : out[NOUT - 1];
}

/* The body klm_token_moments runs: 0 = portable, 1 = AVX2 (see klm_select_isa). Starts
 * portable, which every CPU runs. */
static int klm_isa = 0;

/* Which body runs from now on: want 1 for AVX2, 0 for portable, -1 for the best this CPU
 * takes. AVX2 is granted only where cpuid and xgetbv allow it. Returns the body chosen.
 * Call it before any other entry point runs (klmonitor does, once, while loading). */
int klm_select_isa(int want) {
#ifdef KLM_X86
    int best = cpu_has_avx2();
#else
    int best = 0;
#endif
    klm_isa = want < 0 ? best : (want > 0 && best);
    return klm_isa;
}

/* Whether this CPU (and OS) can run the AVX2 body, whichever is selected. */
int klm_cpu_has_avx2(void) {
#ifdef KLM_X86
    return cpu_has_avx2();
#else
    return 0;
#endif
}

/* Which body runs: 1 with the AVX2 intrinsics, 0 with the portable loop only. */
int klm_vector_isa(void) { return klm_isa; }

/* Whether klm_token_moments reads inputs of this dtype: float32 always; bf16 and fp16 with
 * the AVX2 body (at any clamp). Elsewhere the caller converts to float32 first. */
int klm_reads_dtype(int dtype) {
    if (dtype == KLM_F32) return 1;
    return klm_isa == 1 && (dtype == KLM_BF16 || dtype == KLM_F16);
}

#ifdef KLM_X86
/* klm_token_moments with the AVX2 body: whole vectors of 8 tokens by range_avx2, the last
 * < 8 as float32 by the portable loop. */
static KLM_AVX2_FN void token_moments_avx2(const void* logp, const void* ref, int dtype,
                                           const uint8_t* mask, int64_t lo, int64_t hi,
                                           const float* shift, float clamp, float threshold,
                                           double* out, diag_part* dp) {
    int64_t mid = lo + ((hi - lo) & ~(int64_t)7);
    range_avx2(logp, ref, dtype, mask, lo, mid, shift, clamp, threshold, out, dp);
    if (mid < hi) {
        float tl[8], tr[8];
        double tail[NOUT];
        for (int64_t i = mid; i < hi; i++) {
            tl[i - mid] = load1(logp, i, dtype);
            tr[i - mid] = load1(ref, i, dtype);
        }
        range_float_blocks(tl, tr, mask ? mask + mid : mask, 0, hi - mid, shift, clamp, threshold, tail,
                           dp, mid);
        add_sums(out, tail);
    }
}
#endif

/* Shifted sums over tokens [lo, hi): out = S1[6], S2[6], count, nonfinite, extreme, max|l|.
 * mask may be NULL (every token valid); otherwise a token is valid where mask is nonzero.
 * clamp (> 0, +inf for none) bounds |l| before the estimators; extreme counts the valid,
 * finite tokens with |l| > threshold. Both inputs have element type dtype, which
 * klm_reads_dtype must accept (else out is NaN). */
static void token_moments(const void* logp, const void* ref, int dtype, const uint8_t* mask,
                          int64_t lo, int64_t hi, const float* shift, float clamp, float threshold,
                          double* out, diag_part* dp) {
    if (!klm_reads_dtype(dtype)) {
        for (int k = 0; k < NOUT; k++) out[k] = __builtin_nan("");
        return;
    }
#ifdef KLM_X86
    if (klm_isa == 1) {
        token_moments_avx2(logp, ref, dtype, mask, lo, hi, shift, clamp, threshold, out, dp);
        return;
    }
#endif
    range_float_blocks(logp, ref, mask, lo, hi, shift, clamp, threshold, out, dp, 0);
}

void klm_token_moments(const void* logp, const void* ref, int dtype, const uint8_t* mask,
                       int64_t lo, int64_t hi, const float* shift, float clamp, float threshold,
                       double* out) {
    token_moments(logp, ref, dtype, mask, lo, hi, shift, clamp, threshold, out, 0);
}

/* The rollout check's ratio range (klmonitor.diagnostics.RatioRange) over tokens [lo, hi):
 * the min and max of l = ref - logp (in float, as torch's log-ratio of these inputs) and the
 * count of |l| > ln 2, over the tokens whose mask is nonzero (every token where mask is NULL)
 * and whose l is finite. Folded into mn, mx, cnt. */
static void ratio_range(const void* logp, const void* ref, int dtype, const uint8_t* mask, int64_t lo,
                        int64_t hi, float* mn, float* mx, int64_t* cnt) {
#ifdef KLM_X86
    if (klm_isa == 1) {
        const int64_t mid = lo + ((hi - lo) & ~(int64_t)7);
        ratio_range_avx2(logp, ref, dtype, mask, lo, mid, mn, mx, cnt);
        lo = mid;
    }
#endif
    for (int64_t i = lo; i < hi; i++) {
        const float l = load1(ref, i, dtype) - load1(logp, i, dtype);
        if ((mask && !mask[i]) || !(absf(l) <= FLT_BIG)) continue;
        *mn = l < *mn ? l : *mn;
        *mx = l > *mx ? l : *mx;
        *cnt += absf(l) > KLM_LN2F;
    }
}

/* ratio_range over n tokens in up to nthreads OpenMP threads (one without OpenMP): out = min l,
 * max l (+inf and -inf where no token is usable) and the count of |l| > ln 2. dtype: any of
 * the three element types (both inputs the same). */
void klm_ratio_range(const void* logp, const void* ref, int dtype, const uint8_t* mask, int64_t n,
                     int nthreads, double* out) {
    float mn = __builtin_inff(), mx = -__builtin_inff();
    int64_t cnt = 0;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > 64) nthreads = 64;
#ifdef _OPENMP
    if (nthreads > 1 && n > 0) {
        float pmn[64], pmx[64];
        int64_t pcnt[64];
        int used = 1;
        #pragma omp parallel num_threads(nthreads)
        {
            const int t = omp_get_thread_num(), nt = omp_get_num_threads();
            pmn[t] = __builtin_inff();
            pmx[t] = -__builtin_inff();
            pcnt[t] = 0;
            ratio_range(logp, ref, dtype, mask, n * t / nt, n * (t + 1) / nt, &pmn[t], &pmx[t], &pcnt[t]);
            if (t == 0) used = nt;
        }
        for (int t = 0; t < used; t++) {
            mn = pmn[t] < mn ? pmn[t] : mn;
            mx = pmx[t] > mx ? pmx[t] : mx;
            cnt += pcnt[t];
        }
    } else
#endif
    {
        (void)nthreads;
        ratio_range(logp, ref, dtype, mask, 0, n, &mn, &mx, &cnt);
    }
    out[0] = mn;
    out[1] = mx;
    out[2] = (double)cnt;
}

/* The moments-vector layout of klmonitor/_layout.py (a test checks they agree): count,
 * mean[6], M2[6], tokens, nonfinite, extreme, max|l|. */
#define V_COUNT 0
#define V_MEAN 1
#define V_M2 (V_MEAN + NQ)
#define V_TOKENS (V_M2 + NQ)
#define V_SIZE (V_TOKENS + 4)

int klm_vector_size(void) { return V_SIZE; }

static inline int finite_d(double x) { return x <= DBL_MAX && x >= -DBL_MAX; }

/* Merge shifted sums (as klm_token_moments writes them, with the shift they used) into the
 * moments vector acc, in place: Chan's parallel update in double, as _moments.merge does.
 * Values beyond double (a token with l above ~354 has (r - 1)^2 > DBL_MAX, one above ~709.78
 * has r - 1 = +inf) leave M2, or the mean, +-inf, never NaN: each quantity's infinities
 * share one sign (r - 1, k3, kl_pq: +inf; k2 - k3: -inf; k1 and k2 stay finite). */
void klm_fold_sums(double* acc, const float* shift, const double* sums) {
    const double nb = sums[12];
    if (nb > 0) {
        const double na = acc[V_COUNT], n = na + nb;
        for (int k = 0; k < NQ; k++) {
            const double s1 = sums[k], s2 = sums[NQ + k];
            const double mean_b = (double)shift[k] + s1 / nb;
            /* One sample has M2 = 0 exactly; S2 - S1^2 would leave float32's rounding of
             * the square where the shift sample missed that token. S1 (S1 / nb) <= S2 does
             * not overflow where S2 is finite. */
            double m2_b = 0;
            if (nb != 1) m2_b = finite_d(s2) && finite_d(s1) ? s2 - s1 * (s1 / nb) : INFINITY;
            if (!(m2_b > 0)) m2_b = 0;
            const double mean_a = acc[V_MEAN + k];
            if (na == 0) {
                acc[V_MEAN + k] = mean_b;
                acc[V_M2 + k] = m2_b;
            } else if (finite_d(mean_a) && finite_d(mean_b)) {
                const double delta = mean_b - mean_a;
                acc[V_MEAN + k] = mean_a + delta * (nb / n);
                acc[V_M2 + k] += m2_b + delta * delta * (na * nb / n);
            } else {  /* an infinite mean: the other one cannot cancel it */
                acc[V_MEAN + k] = mean_a * (na / n) + mean_b * (nb / n);
                acc[V_M2 + k] = INFINITY;
            }
        }
        acc[V_COUNT] = n;
    }
    acc[V_TOKENS] += nb;
    acc[V_TOKENS + 1] += sums[13];
    acc[V_TOKENS + 2] += sums[14];
    acc[V_TOKENS + 3] = sums[15] > acc[V_TOKENS + 3] ? sums[15] : acc[V_TOKENS + 3];
}

/* Interface version: klmonitor/_native/__init__.py loads only the version it was written for. */
int klm_abi_version(void) { return 6; }

/* sha256 of the moments.c this library was built from (setup.py defines it), so that a
 * library left from an older source is not used with a newer loader. */
#ifndef KLM_SOURCE_SHA256
#define KLM_SOURCE_SHA256 ""
#endif
const char* klm_source_sha256(void) { return KLM_SOURCE_SHA256; }

/* 1 where klm_fold splits over OpenMP threads itself (built with -fopenmp). */
int klm_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* A thread's diag_part over tokens [lo, hi) (hi > lo), scattering into the token table tab. */
static void diag_part_init(diag_part* p, const klm_diag* d, int64_t lo, int64_t hi, double* tab) {
    p->d = d;
    p->first_row = d->row_len > 0 ? lo / d->row_len : 0;
    p->last_row = d->row_len > 0 ? (hi - 1) / d->row_len : 0;
    p->edge_sum[0] = p->edge_sum[1] = p->edge_count[0] = p->edge_count[1] = 0;
    for (int b = 0; b < KLM_MAX_BUCKETS; b++) p->bsum[b] = p->bcount[b] = 0;
    p->tab = tab;
    p->outside = 0;
    p->ent_shift = 0;
    p->ent[0] = p->ent[1] = p->ent[2] = 0;
}

/* Add a thread's private sums (edge rows, buckets, outside) into the outputs (threads in
 * order: the same sums every run). The token tables are merged by merge_tables. */
static void diag_part_finish(const diag_part* p) {
    const klm_diag* d = p->d;
    if (d->row_len > 0 && d->row_sum) {
        d->row_sum[p->first_row] += p->edge_sum[0];
        d->row_count[p->first_row] += p->edge_count[0];
        if (p->last_row != p->first_row) {
            d->row_sum[p->last_row] += p->edge_sum[1];
            d->row_count[p->last_row] += p->edge_count[1];
        }
    }
    for (int64_t b = 0; b < d->buckets; b++) {
        d->bucket_sum[b] += p->bsum[b];
        d->bucket_count[b] += p->bcount[b];
    }
    if (d->ids) d->outside[0] += p->outside;
}

/* Ids [v0, v1) of the ntab interleaved tables at tabs (2 vocab doubles each), added in table
 * order into the output's sum and count arrays; the tables are left 0 there. */
static void merge_tables(const klm_diag* d, double* tabs, int ntab, int64_t v0, int64_t v1) {
    const size_t stride = 2 * (size_t)d->vocab;
    for (int64_t v = v0; v < v1; v++) {
        double s = 0, c = 0;
        for (int t = 0; t < ntab; t++) {
            double* e = tabs + t * stride + 2 * v;
            s += e[0];
            c += e[1];
            e[0] = e[1] = 0;
        }
        d->token_sum[v] += s;
        d->token_count[v] += c;
    }
}

/* The first masked-in token's logp with both log-probs finite (0 if none): the entropy's
 * shift, so that its float block sums of squares hold the spread, not the mean's square. */
static float entropy_shift(const void* logp, const void* ref, int dtype, const uint8_t* mask, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        if (mask && !mask[i]) continue;
        const float lp = load1(logp, i, dtype), rf = load1(ref, i, dtype);
        if (absf(rf - lp) <= FLT_BIG) return lp;
    }
    return 0.f;
}

/* Merge the batch's entropy sums (count, sum and sum of squares of logp - shift) into
 * d->entropy = [count, mean, M2] of -logp, by Chan's rule. */
static void merge_entropy(const klm_diag* d, float shift, const double* sums) {
    const double nb = sums[0];
    if (nb <= 0) return;
    const double q = sums[1] / nb;
    const double mb = -((double)shift + q);  /* of -logp */
    double m2b = sums[2] - sums[1] * q;
    m2b = m2b > 0 ? m2b : 0;
    double* e = d->entropy;
    const double na = e[0], n = na + nb;
    const double delta = mb - e[1];
    e[1] += delta * (nb / n);
    e[2] += m2b + delta * delta * (na * nb / n);
    e[0] = n;
}

/* 1 where d is consistent for n tokens (sizes given, outputs present), else 0. */
static int diag_ok(const klm_diag* d, int64_t n) {
    if (d->row_len < 0 || d->buckets < 0 || d->buckets > KLM_MAX_BUCKETS) return 0;
    if (d->row_len > 0 && n % d->row_len != 0) return 0;
    if (d->row_len == 0 && (d->row_sum || d->buckets > 0)) return 0;
    if (d->row_sum && !d->row_count) return 0;
    if (d->buckets > 0 && !(d->bucket_sum && d->bucket_count)) return 0;
    if (d->ids && !(d->vocab > 0 && d->token_sum && d->token_count && d->outside)) return 0;
    if (d->scratch_tables < 0 || (d->scratch_tables > 0 && !d->scratch)) return 0;
    return 1;
}

/* Everything one update needs, in one call: the shift sample, the shifted sums over [0, n) on
 * up to nthreads OpenMP threads (clamp and threshold as in klm_token_moments), and the merge
 * into the moments vector acc. Returns 1 when done, 0, doing nothing, when nthreads > 1 but
 * the library was built without OpenMP (the caller then splits the range over its own threads
 * with klm_token_moments and merges with klm_fold_sums). */
int klm_fold(const void* logp, const void* ref, int dtype, const uint8_t* mask, int64_t n,
             float clamp, float threshold, int nthreads, double* acc) {
    float shift[NQ];
    double sums[NOUT];
#ifndef _OPENMP
    if (nthreads > 1) return 0;
#endif
    klm_sample_shift(logp, ref, dtype, mask, n, clamp, shift);
    if (nthreads <= 1) {
        klm_token_moments(logp, ref, dtype, mask, 0, n, shift, clamp, threshold, sums);
    } else {
#ifdef _OPENMP
        double parts[64][NOUT];
        int used = 1;
        if (nthreads > 64) nthreads = 64;
        #pragma omp parallel num_threads(nthreads)
        {
            int t = omp_get_thread_num(), nt = omp_get_num_threads();
            int64_t lo = n * t / nt, hi = n * (t + 1) / nt;
            klm_token_moments(logp, ref, dtype, mask, lo, hi, shift, clamp, threshold, parts[t]);
            if (t == 0) used = nt;
        }
        for (int k = 0; k < NOUT; k++) sums[k] = parts[0][k];
        for (int t = 1; t < used; t++) {
            add_sums(sums, parts[t]);
        }
#endif
    }
    klm_fold_sums(acc, shift, sums);
    return 1;
}

/* klm_fold with the diagnostics of d (see klm_diag) computed in the same pass: each token's
 * k3, as the moments use it, summed per row, per position bucket and per token id, added to
 * d's outputs. Returns 1 when done; 0, doing nothing, when nthreads > 1 without OpenMP (call
 * again with nthreads = 1); -1, doing nothing, when d is inconsistent (sizes, NULL outputs)
 * or the inputs' dtype is not read. With a token table, each thread scatters into a table of
 * d->scratch (where it holds fewer tables than threads, the threads are fewer) or, without
 * scratch, of one allocation per call (where that fails, nothing is done: -1). */
int klm_fold_diag(const void* logp, const void* ref, int dtype, const uint8_t* mask, int64_t n,
                  float clamp, float threshold, int nthreads, double* acc, const klm_diag* d) {
    float shift[NQ];
    double sums[NOUT];
    if (!diag_ok(d, n) || !klm_reads_dtype(dtype)) return -1;
#ifndef _OPENMP
    if (nthreads > 1) return 0;
#endif
    if (n <= 0) return 1;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > 64) nthreads = 64;
    if ((int64_t)nthreads > n) nthreads = (int)n;
    double* tables = 0;
    double* owned = 0;
    if (d->ids) {
        if (d->scratch && d->scratch_tables > 0) {
            tables = d->scratch;
            if ((int64_t)nthreads > d->scratch_tables) nthreads = (int)d->scratch_tables;
        } else {
            owned = tables = (double*)calloc((size_t)nthreads * 2 * (size_t)d->vocab, sizeof(double));
            if (!tables) return -1;
        }
    }
    const size_t stride = 2 * (size_t)d->vocab;
    const float es = d->entropy ? entropy_shift(logp, ref, dtype, mask, n) : 0.f;
    double ent[3] = {0, 0, 0};
    klm_sample_shift(logp, ref, dtype, mask, n, clamp, shift);
    if (nthreads <= 1) {
        diag_part part;
        diag_part_init(&part, d, 0, n, tables);
        part.ent_shift = es;
        token_moments(logp, ref, dtype, mask, 0, n, shift, clamp, threshold, sums, &part);
        diag_part_finish(&part);
        for (int k = 0; k < 3; k++) ent[k] = part.ent[k];
        if (tables) merge_tables(d, tables, 1, 0, d->vocab);
    } else {
#ifdef _OPENMP
        double parts[64][NOUT];
        diag_part dparts[64];
        int used = 1;
        #pragma omp parallel num_threads(nthreads)
        {
            int t = omp_get_thread_num(), nt = omp_get_num_threads();
            int64_t lo = n * t / nt, hi = n * (t + 1) / nt;
            double* tab = tables ? tables + (size_t)t * stride : 0;
            if (hi > lo) {
                diag_part_init(&dparts[t], d, lo, hi, tab);
                dparts[t].ent_shift = es;
                token_moments(logp, ref, dtype, mask, lo, hi, shift, clamp, threshold, parts[t], &dparts[t]);
            } else {
                diag_part_init(&dparts[t], d, 0, 1, tab);
                for (int k = 0; k < NOUT; k++) parts[t][k] = 0;
            }
            if (t == 0) used = nt;
            if (tables) {
                /* Every table is complete; each thread merges a slice of the vocabulary. */
                #pragma omp barrier
                merge_tables(d, tables, nt, d->vocab * t / nt, d->vocab * (t + 1) / nt);
            }
        }
        for (int k = 0; k < NOUT; k++) sums[k] = parts[0][k];
        for (int t = 1; t < used; t++) add_sums(sums, parts[t]);
        for (int t = 0; t < used; t++) {
            diag_part_finish(&dparts[t]);
            for (int k = 0; k < 3; k++) ent[k] += dparts[t].ent[k];
        }
#endif
    }
    if (d->entropy) merge_entropy(d, es, ent);
    free(owned);
    klm_fold_sums(acc, shift, sums);
    return 1;
}
