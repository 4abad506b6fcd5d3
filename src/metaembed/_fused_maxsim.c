/*
 * Fused exact MaxSim for bf16 candidates on CPUs with AVX512-BF16 (Intel Cooper Lake / Sapphire Rapids and
 * later, AMD Zen 4 / Zen 5).
 *
 * Why it exists: one query (1-16 vectors) against N stored items is a GEMM with a tiny side. Library GEMMs
 * stream the big side at a fraction of the memory bandwidth for such shapes and write an (N*r_c, r_q)
 * similarity block that is read back for the max. This kernel reads each candidate vector once, takes
 * dot products against all query vectors while the vector is in registers/L1 (fp32 accumulation with
 * VDPBF16PS), and folds them into the running max per item and query vector straight away.
 *
 * Two loop orders: fold_items streams each block of stored vectors in turn (up to a few queries: memory-bound, and
 * the long sequential reads keep it near the bandwidth), fold_by_item takes items one at a time with running maxima
 * in registers and the items and query vectors blocked for the caches (a large batch: arithmetic-bound).
 *
 * Every dot product is accumulated in the same order whatever the tile shape (the lanes of one accumulator, then
 * the same reduction tree in sum16), so a query scores bit-identically alone and inside any batch: scoring runs
 * every bf16 batch through this kernel for that reason, not only one query.
 *
 * Layout (the index's "vector-major" groups): a block b holds, for every item i, takes[b] vectors of D bf16
 * values at bases[b] + i * item_strides[b] + j * D (j < takes[b]). Queries are m = nq * r_q contiguous
 * vectors of D bf16 values. scores is (nq, n) fp32, row stride n. Items [lo, hi) are scored by one call;
 * the Python side runs disjoint ranges on several threads (ctypes releases the GIL).
 *
 * Built by setup.py as an optional extension module; it exports plain C functions that metaembed.fused
 * loads with ctypes. No CPython API is used beyond the empty module the import machinery needs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define TARGET __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")))
/* Items scored together: their running maxima (m per item) fill about 32 KB, so they stay in L1 while the items'
 * vectors stream by; more items per block means fewer restarts of each group's stream. */
#define BEST_FLOATS 8192
#define MIN_BLOCK 64
#define MAX_BLOCK 4096
#define MAX_QUERY_VECTORS 1024
/* Up to this many query vectors a tile reads its rows one after another (memory-bound: one query with r_q <= 4
 * reads D*r_c values per item for r_q*r_c*D multiply-adds); above it, all rows step through D together. */
#define ROWS_FIRST_MAX_M 4
/* Software prefetch distance in rows (of D values), per loop order: the stepped order's tiles take longer, so it
 * looks fewer rows ahead (two 4-row tiles). The values and the machine they were tuned on: docs/kernels.md. */
#define PREFETCH_ROWS_FIRST 32
#define PREFETCH_ROWS_STEPPED 8
/* fold_by_item: items scored together while their vectors stay in L2 (a quarter of it: the rest holds the query
 * vectors and what comes in next), the query vectors whose tiles share a pass over them (4 running tiles in
 * registers), and how far ahead (in bytes of items) the first pass prefetches the same vectors of a later item.
 * It runs from BY_ITEM_MIN_M query vectors, where items have at least 4 vectors and few 4-vector tiles need padding.
 * Measured on the build machine (thread CPU time, against fold_items' stepped 4 x 4 order): on items in cache it is
 * faster from 16 query vectors, but from memory it is slower up to 16 (D = 384, 16x64: one query), even at 32 and
 * faster from 128, because reading the blocks' arrays item by item streams worse than one array after another. */
#define CHUNK_BYTES (256 * 1024)
#define QUERY_CHUNK 16
#define PREFETCH_ITEM_BYTES 4096
#define BY_ITEM_MIN_M 64

/* 1 when this CPU and OS run AVX512-BF16 (libgcc checks the OS saves the zmm state). */
int metaembed_fused_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512bf16");
}

/* Sixteen horizontal sums at once: lane L of the result is the sum of the lanes of a[4 * (L % 4) + L / 4].
 * (Two rounds of 128-bit block shuffles, then a 4x4 transpose inside each block: 45 instructions instead of
 * sixteen separate reductions.) */
TARGET static inline __m512 sum16(const __m512 a[16]) {
    __m512 s1[8], s2[4];
    for (int j = 0; j < 8; j++)
        s1[j] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * j], a[2 * j + 1], 0x44),
                              _mm512_shuffle_f32x4(a[2 * j], a[2 * j + 1], 0xEE));
    for (int j = 0; j < 4; j++)
        s2[j] = _mm512_add_ps(_mm512_shuffle_f32x4(s1[2 * j], s1[2 * j + 1], 0x88),
                              _mm512_shuffle_f32x4(s1[2 * j], s1[2 * j + 1], 0xDD));
    __m512 u0 = _mm512_add_ps(_mm512_unpacklo_ps(s2[0], s2[1]), _mm512_unpackhi_ps(s2[0], s2[1]));
    __m512 u1 = _mm512_add_ps(_mm512_unpacklo_ps(s2[2], s2[3]), _mm512_unpackhi_ps(s2[2], s2[3]));
    return _mm512_add_ps(_mm512_shuffle_ps(u0, u1, _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(u0, u1, _MM_SHUFFLE(3, 2, 3, 2)));
}

/* Lane q * RT + r = <query q, candidate row r> for a QT x RT tile (QT * RT = 16), fp32 accumulation.
 * ahead > 0: also prefetch each row's line that many elements further on (the same row of a later tile).
 * ROWS_FIRST: read each row front to back before the next (one memory stream at a time: ~1.5x the bandwidth
 * when there is little arithmetic per byte); otherwise step all rows together through D (each query load
 * feeds RT dot products: ~2x the arithmetic rate when there are many query vectors). */
TARGET static inline __attribute__((always_inline)) __m512 tile(const uint16_t *const *query,
                                                                const uint16_t *const *row, int64_t dim, const int QT,
                                                                const int RT, int64_t ahead, const int ROWS_FIRST) {
    __m512 acc[16];
    for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_ps();
    const int64_t full = dim & ~(int64_t)31;
    if (ROWS_FIRST) {
        for (int r = 0; r < RT; r++)
            for (int64_t k = 0; k < full; k += 32) {
                if (ahead) _mm_prefetch((const char *)(row[r] + k + ahead), _MM_HINT_T0);
                __m512bh c = (__m512bh)_mm512_loadu_si512(row[r] + k);
                for (int a = 0; a < QT; a++)
                    acc[a * RT + r] = _mm512_dpbf16_ps(acc[a * RT + r], (__m512bh)_mm512_loadu_si512(query[a] + k), c);
            }
    }
    int64_t k = ROWS_FIRST ? full : 0;
    for (; k + 32 <= dim; k += 32) {
        __m512bh q[4];
        for (int a = 0; a < QT; a++) q[a] = (__m512bh)_mm512_loadu_si512(query[a] + k);
        for (int r = 0; r < RT; r++) {
            if (ahead) _mm_prefetch((const char *)(row[r] + k + ahead), _MM_HINT_T0);
            __m512bh c = (__m512bh)_mm512_loadu_si512(row[r] + k);
            for (int a = 0; a < QT; a++) acc[a * RT + r] = _mm512_dpbf16_ps(acc[a * RT + r], q[a], c);
        }
    }
    if (k < dim) { /* D not a multiple of 32: masked loads read zeros past the end */
        __mmask32 mask = (__mmask32)((1ull << (dim - k)) - 1);
        __m512bh q[4];
        for (int a = 0; a < QT; a++) q[a] = (__m512bh)_mm512_maskz_loadu_epi16(mask, query[a] + k);
        for (int r = 0; r < RT; r++) {
            __m512bh c = (__m512bh)_mm512_maskz_loadu_epi16(mask, row[r] + k);
            for (int a = 0; a < QT; a++) acc[a * RT + r] = _mm512_dpbf16_ps(acc[a * RT + r], q[a], c);
        }
    }
    __m512 ordered[16]; /* so that lane L of sum16's result is acc[L] */
    for (int L = 0; L < 16; L++) ordered[4 * (L % 4) + L / 4] = acc[L];
    return sum16(ordered);
}

/* Every lane becomes the max of its run of RT consecutive lanes (RT = 4, 8 or 16): a tile whose rows all
 * belong to one item is reduced to one value per query vector in registers. */
TARGET static inline __m512 max_over_rows(__m512 v, const int RT) {
    v = _mm512_max_ps(v, _mm512_permute_ps(v, 0xB1)); /* neighbours */
    v = _mm512_max_ps(v, _mm512_permute_ps(v, 0x4E)); /* pairs: runs of 4 */
    if (RT >= 8) v = _mm512_max_ps(v, _mm512_shuffle_f32x4(v, v, 0xB1)); /* 128-bit blocks: runs of 8 */
    if (RT >= 16) v = _mm512_max_ps(v, _mm512_shuffle_f32x4(v, v, 0x4E)); /* halves: all 16 */
    return v;
}

/* One block of items: fold every stored vector of every block into best[q][item], QT x RT tiles at a time. */
TARGET static inline __attribute__((always_inline)) void fold_items(
    const uint16_t *queries, int64_t m, int64_t dim, int64_t nblocks, const uint16_t *const *bases,
    const int64_t *takes, const int64_t *item_strides, const int64_t *index, int64_t first, int64_t count, float *best,
    int64_t block, const int QT, const int RT, const int ROWS_FIRST) {
    const uint16_t *query[4];
    const uint16_t *row[16];
    int64_t item[16] = {0};
    float dots[16];
    for (int64_t b = 0; b < nblocks; b++) {
        const int64_t take = takes[b], rows = count * take;
        /* Prefetch the same vector of the item that many rows further on. Back-to-back items are one stream and
         * this is a fixed number of rows ahead; items further apart (a budget's prefix of a full (N, R, D) tensor)
         * are short runs the hardware prefetcher does not follow across the gap, so the software prefetch is what
         * keeps them near the dense prefix's speed. */
        const int64_t prefetch_rows = ROWS_FIRST ? PREFETCH_ROWS_FIRST : PREFETCH_ROWS_STEPPED;
        /* a row list has no fixed distance to the next item's rows: the hardware prefetcher is all it gets */
        const int64_t ahead = index                         ? 0
                              : item_strides[b] == take * dim ? prefetch_rows * dim
                                                              : (prefetch_rows + take - 1) / take * item_strides[b];
        int64_t next_item = 0, next_vector = 0; /* the next row, counted (no divisions in the loop) */
        for (int64_t r0 = 0; r0 < rows; r0 += RT) {
            const int valid_rows = rows - r0 < RT ? (int)(rows - r0) : RT;
            for (int r = 0; r < valid_rows; r++) {
                item[r] = next_item;
                const int64_t at = index ? index[first + next_item] : first + next_item;
                row[r] = bases[b] + at * item_strides[b] + next_vector * dim;
                if (++next_vector == take) next_vector = 0, next_item++;
            }
            for (int r = valid_rows; r < RT; r++) { /* a short last tile repeats a row; its dots are ignored */
                item[r] = item[valid_rows - 1];
                row[r] = row[valid_rows - 1];
            }
            for (int64_t q0 = 0; q0 < m; q0 += QT) {
                const int valid_q = m - q0 < QT ? (int)(m - q0) : QT;
                for (int a = 0; a < QT; a++) query[a] = queries + (q0 + (a < valid_q ? a : valid_q - 1)) * dim;
                const __m512 sims = tile(query, row, dim, QT, RT, q0 == 0 ? ahead : 0, ROWS_FIRST);
                if (item[0] == item[RT - 1]) { /* one item (padding repeats a row): max in registers first */
                    _mm512_storeu_ps(dots, max_over_rows(sims, RT));
                    for (int a = 0; a < valid_q; a++) {
                        float *at = best + (q0 + a) * block + item[0];
                        *at = fmaxf(*at, dots[a * RT]);
                    }
                    continue;
                }
                _mm512_storeu_ps(dots, sims);
                if (take == 1 && valid_rows == RT) { /* RT consecutive items: one vector max per query vector */
                    for (int a = 0; a < valid_q; a++) {
                        float *at = best + (q0 + a) * block + item[0];
                        if (RT == 16) {
                            _mm512_storeu_ps(at, _mm512_max_ps(_mm512_loadu_ps(at), sims));
                        } else if (RT == 8) {
                            _mm256_storeu_ps(at, _mm256_max_ps(_mm256_loadu_ps(at), _mm256_loadu_ps(dots + a * 8)));
                        } else {
                            _mm_storeu_ps(at, _mm_max_ps(_mm_loadu_ps(at), _mm_loadu_ps(dots + a * 4)));
                        }
                    }
                    continue;
                }
                for (int a = 0; a < valid_q; a++) {
                    float *line = best + (q0 + a) * block;
                    for (int r = 0; r < valid_rows; r++) line[item[r]] = fmaxf(line[item[r]], dots[a * RT + r]);
                }
            }
        }
    }
}

/* Items one after another, all of an item's stored vectors (over all blocks) before the next. Each 4 x 4 tile
 * (4 query vectors x 4 of the item's vectors, stepped through D) is max'ed lane-wise into a running tile per 4 query
 * vectors, kept in registers; the max over the item's vectors per query vector is taken once per item instead of
 * once per tile, and no tile mixes items (the 1- and 3-vector blocks of the ladder are tiled together). best is
 * written, not max'ed: each item is finished in one go. Returns 0, or -1 when out of memory.
 *
 * Cache blocking: items are taken in chunks whose vectors fit in L2 and query vectors in runs of QUERY_CHUNK, so a
 * batch reads a chunk from memory once and from L2 once per run, while the run's query vectors stay in L1. The first
 * run prefetches the same vectors of an item PREFETCH_ITEM_BYTES further on. One query (<= 16 vectors) is one run:
 * a single pass over the items. */
TARGET static int fold_by_item(const uint16_t *queries, int64_t m, int64_t dim, int64_t nblocks,
                               const uint16_t *const *bases, const int64_t *takes, const int64_t *item_strides,
                               const int64_t *index, int64_t first, int64_t count, int64_t available, float *best,
                               int64_t block) {
    int64_t per_item = 0;
    for (int64_t b = 0; b < nblocks; b++) per_item += takes[b];
    const int64_t item_bytes = per_item * dim * (int64_t)sizeof(uint16_t);
    const int64_t fit = CHUNK_BYTES / item_bytes, chunk = fit < 1 ? 1 : fit;
    const int64_t distance = (PREFETCH_ITEM_BYTES + item_bytes - 1) / item_bytes; /* in items */
    const int64_t tiles = (per_item + 3) / 4;
    const uint16_t **rows = malloc(sizeof(*rows) * tiles * 4);
    int64_t *ahead = malloc(sizeof(*ahead) * tiles * 4); /* per row, then per tile */
    if (!rows || !ahead) {
        free(rows), free(ahead);
        return -1;
    }
    for (int64_t c0 = 0; c0 < count; c0 += chunk) {
        const int64_t c1 = count - c0 < chunk ? count : c0 + chunk;
        for (int64_t q0 = 0; q0 < m; q0 += QUERY_CHUNK) {
            const int64_t q1 = m - q0 < QUERY_CHUNK ? m : q0 + QUERY_CHUNK;
            const int groups = (int)((q1 - q0 + 3) / 4);
            const uint16_t *query[QUERY_CHUNK]; /* a short last group repeats a vector; its maxima are not written */
            for (int v = 0; v < 4 * groups; v++) query[v] = queries + (q0 + v < q1 ? q0 + v : q1 - 1) * dim;
            for (int64_t i = c0; i < c1; i++) {
                int64_t r = 0;
                for (int64_t b = 0; b < nblocks; b++)
                    for (int64_t j = 0; j < takes[b]; j++, r++) {
                        rows[r] = bases[b] + (index ? index[first + i] : first + i) * item_strides[b] + j * dim;
                        ahead[r] = index ? 0 : distance * item_strides[b];
                    }
                for (; r < tiles * 4; r++) { /* a repeated vector leaves the max as it is */
                    rows[r] = rows[per_item - 1];
                    ahead[r] = ahead[per_item - 1];
                }
                for (int64_t t = 0; t < tiles; t++) { /* a tile across blocks of other strides: no prefetch */
                    const int64_t *a = ahead + 4 * t;
                    ahead[t] = a[0] == a[1] && a[0] == a[2] && a[0] == a[3] ? a[0] : 0;
                }
                const int prefetch = q0 == 0 && i + distance < available;
                __m512 run[QUERY_CHUNK / 4];
                for (int g = 0; g < groups; g++) run[g] = _mm512_set1_ps(-INFINITY);
                for (int64_t t = 0; t < tiles; t++)
                    for (int g = 0; g < groups; g++) {
                        const int64_t pf = prefetch && g == 0 ? ahead[t] : 0;
                        run[g] = _mm512_max_ps(run[g], tile(query + 4 * g, rows + 4 * t, dim, 4, 4, pf, 0));
                    }
                for (int g = 0; g < groups; g++) {
                    float lanes[16];
                    _mm512_storeu_ps(lanes, max_over_rows(run[g], 4)); /* lane 4a: query vector a's max */
                    for (int a = 0; a < 4 && q0 + 4 * g + a < q1; a++)
                        best[(q0 + 4 * g + a) * block + i] = lanes[4 * a];
                }
            }
        }
    }
    free(rows), free(ahead);
    return 0;
}

/* One block of items into best, in the loop order and tile shape that suits m query vectors. Returns 0, or -1 when
 * out of memory. */
TARGET static int fold_block(const uint16_t *queries, int64_t m, int64_t dim, int64_t nblocks,
                             const uint16_t *const *bases, const int64_t *takes, const int64_t *item_strides,
                             const int64_t *index, int64_t first, int64_t count, int64_t available, float *best,
                             int64_t block) {
    int64_t per_item = 0;
    for (int64_t b = 0; b < nblocks; b++) per_item += takes[b];
    if (m >= BY_ITEM_MIN_M && (per_item % 4 == 0 || per_item >= 12)) /* at most 1 in 5 rows a padding repeat */
        return fold_by_item(queries, m, dim, nblocks, bases, takes, item_strides, index, first, count, available,
                            best, block);
    /* tile shapes keep 16 accumulators: one query vector x 16 rows, 2 x 8, or 4 x 4 */
#define FOLD(QT, RT, ROWS_FIRST) \
    fold_items(queries, m, dim, nblocks, bases, takes, item_strides, index, first, count, best, block, QT, RT, \
               ROWS_FIRST)
    if (m == 1)
        FOLD(1, 16, 1);
    else if (m <= 3)
        FOLD(2, 8, 1);
    else if (m <= ROWS_FIRST_MAX_M)
        FOLD(4, 4, 1);
    else
        FOLD(4, 4, 0);
#undef FOLD
    return 0;
}

/* Scores of items [lo, hi) -- stored items index[lo..hi) when index is given, else items lo..hi:
 * scores[query][item] = sum over its r_q vectors of the best dot product. Returns 0, or -1 when m is out of range
 * or memory runs out. The row list only changes where each item's rows are read: every dot product, max and sum
 * is the same as for those items gathered into an array of their own, so the scores are bit-identical. */
TARGET static int maxsim(const uint16_t *queries, int64_t nq, int64_t r_q, int64_t dim, int64_t nblocks,
                         const uint16_t *const *bases, const int64_t *takes, const int64_t *item_strides,
                         const int64_t *index, int64_t lo, int64_t hi, float *scores, int64_t n) {
    const int64_t m = nq * r_q;
    if (m < 1 || m > MAX_QUERY_VECTORS) return -1;
    const int64_t fit = BEST_FLOATS / m, block = fit < MIN_BLOCK ? MIN_BLOCK : fit > MAX_BLOCK ? MAX_BLOCK : fit;
    float *best = malloc(sizeof(float) * m * block);
    if (!best) return -1;
    for (int64_t first = lo; first < hi; first += block) {
        const int64_t count = hi - first < block ? hi - first : block;
        for (int64_t i = 0; i < m * block; i++) best[i] = -INFINITY;
        if (fold_block(queries, m, dim, nblocks, bases, takes, item_strides, index, first, count, hi - first, best,
                       block)) {
            free(best);
            return -1;
        }
        for (int64_t q = 0; q < nq; q++) {
            float *out = scores + q * n + first;
            for (int64_t i = 0; i < count; i++) out[i] = 0.0f;
            for (int64_t v = 0; v < r_q; v++) {
                const float *line = best + (q * r_q + v) * block;
                for (int64_t i = 0; i < count; i++) out[i] += line[i];
            }
        }
    }
    free(best);
    return 0;
}

TARGET int metaembed_maxsim_bf16(const uint16_t *queries, int64_t nq, int64_t r_q, int64_t dim, int64_t nblocks,
                                 const uint16_t *const *bases, const int64_t *takes, const int64_t *item_strides,
                                 int64_t lo, int64_t hi, float *scores, int64_t n) {
    return maxsim(queries, nq, r_q, dim, nblocks, bases, takes, item_strides, NULL, lo, hi, scores, n);
}

/* The same for a row list: column i of scores (nq, n) is stored item index[i], for i in [lo, hi) (any order,
 * repeats allowed; the caller checks every index is in range). Rescoring a shortlist reads its rows where they
 * lie instead of copying them out first. */
TARGET int metaembed_maxsim_bf16_rows(const uint16_t *queries, int64_t nq, int64_t r_q, int64_t dim, int64_t nblocks,
                                      const uint16_t *const *bases, const int64_t *takes,
                                      const int64_t *item_strides, const int64_t *index, int64_t lo, int64_t hi,
                                      float *scores, int64_t n) {
    return maxsim(queries, nq, r_q, dim, nblocks, bases, takes, item_strides, index, lo, hi, scores, n);
}

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_fused_maxsim",
    .m_doc = "Fused bf16 MaxSim kernel, called through ctypes (see metaembed.fused).",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__fused_maxsim(void) { return PyModule_Create(&module); }
