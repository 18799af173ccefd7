/* The floor of top_tokens on a CPU: not part of klmonitor, built and timed by
 * benchmarks/bench_diagnostics.py (--floor, the default where a C compiler works).
 *
 * The loop reads what the fused kernel reads (float32 log-probs, a uint8 mask, int64 token
 * ids) in blocks of 512 tokens, as the kernel does, and computes the least per-token value
 * (w l**2 / 2, l = ref - logp; w: the mask) into a block buffer. With scatter = 1 it then adds
 * each token's value and weight into its thread's interleaved (sum, count) float64 table of
 * the vocabulary, as the kernel's token table does; nothing else (no moments, no merge of the
 * threads' tables, no top-k). The difference between the two calls is what the scatter alone
 * costs inside a streaming pass over the batch: a bound under any exact per-id table. */
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define FLOOR_BLOCK 512

static double floor_range(const float* logp, const float* ref, const uint8_t* mask, const int64_t* ids,
                          int64_t lo, int64_t hi, int64_t vocab, double* tab, int scatter) {
    float bk[FLOOR_BLOCK] __attribute__((aligned(32)));
    float bw[FLOOR_BLOCK] __attribute__((aligned(32)));
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    double out = 0;
    const uint64_t V = (uint64_t)vocab;
    for (int64_t b = lo; b < hi; b += FLOOR_BLOCK) {
        const int nb = (int)(hi - b < FLOOR_BLOCK ? hi - b : FLOOR_BLOCK);
        for (int j = 0; j < nb; j++) {
            const float l = ref[b + j] - logp[b + j];
            const float w = (float)mask[b + j];
            bk[j] = 0.5f * l * l * w;
            bw[j] = w;
        }
        int j = 0;
        for (; j + 4 <= nb; j += 4) {
            s0 += bk[j]; s1 += bk[j + 1]; s2 += bk[j + 2]; s3 += bk[j + 3];
        }
        for (; j < nb; j++) s0 += bk[j];
        if (scatter) {
            const int64_t* id = ids + b;
            for (int k = 0; k < nb; k++) {
                const int64_t x = id[k];
                if ((uint64_t)x < V) {
                    tab[2 * x] += bk[k];
                    tab[2 * x + 1] += bw[k];
                } else {
                    out += bw[k];
                }
            }
        }
    }
    return out + (double)((s0 + s1) + (s2 + s3));
}

/* Over n tokens in nthreads threads; tables: nthreads x 2 vocab doubles (any values: they
 * only grow). Returns a sum of what was computed, so that nothing is optimised away. */
double klm_floor(const float* logp, const float* ref, const uint8_t* mask, const int64_t* ids, int64_t n,
                 int64_t vocab, double* tables, int nthreads, int scatter) {
    double total = 0;
    if (nthreads < 1) nthreads = 1;
#ifdef _OPENMP
    #pragma omp parallel num_threads(nthreads) reduction(+ : total)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int64_t lo = n * t / nt, hi = n * (t + 1) / nt;
        if (hi > lo) total += floor_range(logp, ref, mask, ids, lo, hi, vocab, tables + (int64_t)t * 2 * vocab, scatter);
    }
#else
    total = floor_range(logp, ref, mask, ids, 0, n, vocab, tables, scatter);
#endif
    return total;
}
