/*
 * Fused exact MaxSim for bf16 or int8 candidates on CPUs with AVX512-BF16 and AVX512-VNNI (Intel Cooper Lake /
 * Sapphire Rapids and later, AMD Zen 4 / Zen 5).
 *
 * Why it exists: one query (1-16 vectors) against N stored items is a GEMM with a tiny side. Library GEMMs
 * stream the big side at a fraction of the memory bandwidth for such shapes and write an (N*r_c, r_q)
 * similarity block that is read back for the max. This kernel reads each candidate vector once, takes
 * dot products against all query vectors while the vector is in registers/L1, and folds them into the running
 * max per item and query vector straight away.
 *
 * Two element types, one loop structure (every load is 64 bytes: 32 bf16 values or 64 int8 codes):
 * - bf16: VDPBF16PS, fp32 accumulation.
 * - int8: the stored codes (per-vector scale s_c, x ~ code * s_c) against the query quantised per vector to int8
 *   codes (scale s_q). VPDPBUSD multiplies unsigned by signed bytes, so each candidate byte is flipped to
 *   code + 128 (an XOR with 0x80) and 128 * sum(query codes) -- computed once per query vector by the caller -- is
 *   taken off again: the dot product of the codes is exact in int32. Then s_c is applied per candidate vector
 *   before the max over an item's vectors, and s_q to each query vector's max (s_q > 0 leaves the max alone).
 *   Half the bytes of bf16 and twice the multiply-adds per instruction.
 *
 * Two loop orders: fold_items streams each block of stored vectors in turn (up to a few queries: memory-bound, and
 * the long sequential reads keep it near the bandwidth), fold_by_item takes items one at a time with running maxima
 * in registers and the items and query vectors blocked for the caches (a large batch: arithmetic-bound).
 *
 * Every dot product is accumulated in the same order whatever the tile shape (the lanes of one accumulator, then
 * the same reduction tree in sum16), so a query scores bit-identically alone and inside any batch: scoring runs
 * every bf16 / int8 batch through this kernel for that reason, not only one query.
 *
 * Layout (the index's "vector-major" groups): a block b holds, for every item i, takes[b] vectors of D values at
 * bases[b] + (i * item_strides[b] + j * D) elements (j < takes[b]); int8 blocks have their scales at
 * scale_bases[b] + i * scale_strides[b] + j. Queries are m = nq * r_q contiguous vectors of D values. scores is
 * (nq, n) fp32, row stride n. Items [lo, hi) are scored by one call; the Python side runs disjoint ranges on
 * several threads (ctypes releases the GIL).
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

#define TARGET __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx512vnni")))
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

/* 1 when this CPU and OS run AVX512-BF16 and AVX512-VNNI (libgcc checks the OS saves the zmm state). */
int metaembed_fused_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vnni");
}

/* What one kernel call reads: the query vectors and the stored blocks (see the layout above). */
struct source {
    const char *queries;             /* m vectors of dim values: bf16, or int8 codes */
    const int32_t *query_offsets;    /* int8: 128 * the sum of each query vector's codes */
    const float *query_scales;       /* int8: each query vector's scale */
    int64_t m, dim, nblocks;
    const char *const *bases;
    const float *const *scale_bases; /* int8: per block, the per-vector scales */
    const int64_t *takes, *item_strides, *scale_strides;
    const int64_t *index; /* NULL, or the stored item of each scored column */
};

/* The larger of two finite scores, inline (fmaxf's NaN rules make GCC call libm for it). */
static inline float larger(float a, float b) { return a > b ? a : b; }

/* Lane-wise a + b: fp32, or int32 for int8's exact integer dot products (kept in __m512 registers). */
TARGET static inline __m512 add(__m512 a, __m512 b, const int I8) {
    return I8 ? _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(a), _mm512_castps_si512(b)))
              : _mm512_add_ps(a, b);
}

/* Sixteen horizontal sums at once: lane L of the result is the sum of the lanes of a[4 * (L % 4) + L / 4].
 * (Two rounds of 128-bit block shuffles, then a 4x4 transpose inside each block: 45 instructions instead of
 * sixteen separate reductions.) */
TARGET static inline __m512 sum16(const __m512 a[16], const int I8) {
    __m512 s1[8], s2[4];
    for (int j = 0; j < 8; j++)
        s1[j] = add(_mm512_shuffle_f32x4(a[2 * j], a[2 * j + 1], 0x44),
                    _mm512_shuffle_f32x4(a[2 * j], a[2 * j + 1], 0xEE), I8);
    for (int j = 0; j < 4; j++)
        s2[j] = add(_mm512_shuffle_f32x4(s1[2 * j], s1[2 * j + 1], 0x88),
                    _mm512_shuffle_f32x4(s1[2 * j], s1[2 * j + 1], 0xDD), I8);
    __m512 u0 = add(_mm512_unpacklo_ps(s2[0], s2[1]), _mm512_unpackhi_ps(s2[0], s2[1]), I8);
    __m512 u1 = add(_mm512_unpacklo_ps(s2[2], s2[3]), _mm512_unpackhi_ps(s2[2], s2[3]), I8);
    return add(_mm512_shuffle_ps(u0, u1, _MM_SHUFFLE(1, 0, 1, 0)), _mm512_shuffle_ps(u0, u1, _MM_SHUFFLE(3, 2, 3, 2)),
               I8);
}

/* 64 bytes of a stored row as the dot product reads them: int8 codes flipped to code + 128 for VPDPBUSD. */
TARGET static inline __m512i row_bytes(__m512i raw, const int I8) {
    return I8 ? _mm512_xor_si512(raw, _mm512_set1_epi8((char)0x80)) : raw;
}

/* acc + the dot products of 64 bytes of a query vector and of a row, lane by lane. */
TARGET static inline __m512 dot64(__m512 acc, __m512i query, __m512i row, const int I8) {
    return I8 ? _mm512_castsi512_ps(_mm512_dpbusd_epi32(_mm512_castps_si512(acc), row, query))
              : _mm512_dpbf16_ps(acc, (__m512bh)query, (__m512bh)row);
}

/* Lane q * RT + r = <query q, candidate row r> for a QT x RT tile (QT * RT = 16): fp32 for bf16; for int8 the exact
 * integer dot product less offsets (lane-wise), converted and scaled by row_scales (lane-wise) -- the caller's
 * vectors for this tile's lanes. ahead > 0: also prefetch each row's line that many bytes further on (the same row
 * of a later tile). ROWS_FIRST: read each row front to back before the next (one memory stream at a time: ~1.5x the
 * bandwidth when there is little arithmetic per byte); otherwise step all rows together through D (each query load
 * feeds RT dot products: ~2x the arithmetic rate when there are many query vectors). */
TARGET static inline __attribute__((always_inline)) __m512 tile(const char *const *query, const char *const *row,
                                                                int64_t bytes, const int QT, const int RT,
                                                                int64_t ahead, const int ROWS_FIRST, const int I8,
                                                                __m512i offsets, __m512 row_scales) {
    __m512 acc[16];
    for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_ps();
    const int64_t full = bytes & ~(int64_t)63;
    if (ROWS_FIRST) {
        for (int r = 0; r < RT; r++)
            for (int64_t k = 0; k < full; k += 64) {
                if (ahead) _mm_prefetch(row[r] + k + ahead, _MM_HINT_T0);
                __m512i c = row_bytes(_mm512_loadu_si512(row[r] + k), I8);
                for (int a = 0; a < QT; a++)
                    acc[a * RT + r] = dot64(acc[a * RT + r], _mm512_loadu_si512(query[a] + k), c, I8);
            }
    }
    int64_t k = ROWS_FIRST ? full : 0;
    for (; k + 64 <= bytes; k += 64) {
        __m512i q[4];
        for (int a = 0; a < QT; a++) q[a] = _mm512_loadu_si512(query[a] + k);
        for (int r = 0; r < RT; r++) {
            if (ahead) _mm_prefetch(row[r] + k + ahead, _MM_HINT_T0);
            __m512i c = row_bytes(_mm512_loadu_si512(row[r] + k), I8);
            for (int a = 0; a < QT; a++) acc[a * RT + r] = dot64(acc[a * RT + r], q[a], c, I8);
        }
    }
    if (k < bytes) { /* D not a multiple of 64 bytes: masked loads read zeros past the end (a zero query byte
                        cancels int8's flipped row byte) */
        __mmask64 mask = (__mmask64)((1ull << (bytes - k)) - 1);
        __m512i q[4];
        for (int a = 0; a < QT; a++) q[a] = _mm512_maskz_loadu_epi8(mask, query[a] + k);
        for (int r = 0; r < RT; r++) {
            __m512i c = row_bytes(_mm512_maskz_loadu_epi8(mask, row[r] + k), I8);
            for (int a = 0; a < QT; a++) acc[a * RT + r] = dot64(acc[a * RT + r], q[a], c, I8);
        }
    }
    __m512 ordered[16]; /* so that lane L of sum16's result is acc[L] */
    for (int L = 0; L < 16; L++) ordered[4 * (L % 4) + L / 4] = acc[L];
    const __m512 sums = sum16(ordered, I8);
    if (!I8) return sums;
    const __m512i dots = _mm512_sub_epi32(_mm512_castps_si512(sums), offsets);
    return _mm512_mul_ps(_mm512_cvtepi32_ps(dots), row_scales);
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

/* int8: lane a * RT + r of a tile gets the offset of its query vector a (of those from first, the last valid one
 * repeated) and the scale of its row r (one of RT). */
TARGET static inline __m512i tile_offsets(const int32_t *offsets, int valid, const int RT) {
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i a = _mm512_min_epi32(_mm512_srli_epi32(lane, __builtin_ctz(RT)), _mm512_set1_epi32(valid - 1));
    return _mm512_permutexvar_epi32(a, _mm512_maskz_loadu_epi32((__mmask16)((1u << valid) - 1), offsets));
}

TARGET static inline __m512 tile_scales(const float *scales, const int RT) {
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i r = _mm512_and_si512(lane, _mm512_set1_epi32(RT - 1));
    return _mm512_permutexvar_ps(r, _mm512_maskz_loadu_ps((__mmask16)((1u << RT) - 1), scales));
}

/* Where stored vector j of item i of block b lies, and its scale (int8). */
static inline const char *row_at(const struct source *s, int64_t b, int64_t i, int64_t j, int64_t size) {
    const int64_t at = s->index ? s->index[i] : i;
    return s->bases[b] + (at * s->item_strides[b] + j * s->dim) * size;
}

static inline float scale_at(const struct source *s, int64_t b, int64_t i, int64_t j) {
    const int64_t at = s->index ? s->index[i] : i;
    return s->scale_bases[b][at * s->scale_strides[b] + j];
}

/* bf16, the stepped 4 x 4 order, for a block whose items have a multiple of 4 vectors and up to 16 query vectors:
 * an item's tiles follow one another, so their lane-wise maxima stay in registers (one per 4 query vectors) and the
 * max over the item's rows is reduced and stored once per item, not once per tile. Max is exact: the same scores as
 * tile by tile. ahead: the block's prefetch distance in bytes (fold_items). */
TARGET static inline __attribute__((always_inline)) void fold_whole_tiles(const struct source *s, int64_t b,
                                                                          int64_t first, int64_t count, float *best,
                                                                          int64_t block, int64_t ahead) {
    const int64_t size = 2, m = s->m, dim = s->dim, take = s->takes[b];
    const int groups = (int)((m + 3) / 4);
    const char *query[16]; /* a short last group repeats a vector; its maxima are not written */
    for (int v = 0; v < 4 * groups; v++) query[v] = s->queries + (v < m ? v : m - 1) * dim * size;
    const __m512i unused = _mm512_setzero_si512(); /* int8's offsets and scales */
    for (int64_t i = 0; i < count; i++) {
        __m512 run[4];
        for (int g = 0; g < groups; g++) run[g] = _mm512_set1_ps(-INFINITY);
        for (int64_t j = 0; j < take; j += 4) {
            const char *row[4];
            for (int r = 0; r < 4; r++) row[r] = row_at(s, b, first + i, j + r, size);
            for (int g = 0; g < groups; g++)
                run[g] = _mm512_max_ps(run[g], tile(query + 4 * g, row, dim * size, 4, 4, g == 0 ? ahead : 0, 0, 0,
                                                    unused, _mm512_castsi512_ps(unused)));
        }
        for (int g = 0; g < groups; g++) {
            float lanes[16];
            _mm512_storeu_ps(lanes, max_over_rows(run[g], 4)); /* lane 4a: query vector a's max */
            for (int a = 0; a < 4 && 4 * g + a < m; a++) {
                float *at = best + (4 * g + a) * block + i;
                *at = larger(*at, lanes[4 * a]);
            }
        }
    }
}

/* One block of items: fold every stored vector of every block into best[q][item], QT x RT tiles at a time. */
TARGET static inline __attribute__((always_inline)) void fold_items(const struct source *s, int64_t first,
                                                                    int64_t count, float *best, int64_t block,
                                                                    const int QT, const int RT, const int ROWS_FIRST,
                                                                    const int I8) {
    const int64_t size = I8 ? 1 : 2, m = s->m, dim = s->dim;
    const char *query[4];
    const char *row[16];
    float scales[16] = {0};
    int64_t item[16] = {0};
    float dots[16];
    __m512 row_scales = _mm512_setzero_ps();
    for (int64_t b = 0; b < s->nblocks; b++) {
        const int64_t take = s->takes[b], rows = count * take, stride = s->item_strides[b];
        /* Prefetch the same vector of the item that many rows further on. Back-to-back items are one stream and
         * this is a fixed number of rows ahead; items further apart (a budget's prefix of a full (N, R, D) tensor)
         * are short runs the hardware prefetcher does not follow across the gap, so the software prefetch is what
         * keeps them near the dense prefix's speed. */
        const int64_t prefetch_rows = ROWS_FIRST ? PREFETCH_ROWS_FIRST : PREFETCH_ROWS_STEPPED;
        /* a row list has no fixed distance to the next item's rows: the hardware prefetcher is all it gets */
        const int64_t ahead = s->index         ? 0
                              : stride == take * dim ? prefetch_rows * dim * size
                                                     : (prefetch_rows + take - 1) / take * stride * size;
        if (!I8 && QT == 4 && !ROWS_FIRST && take % 4 == 0 && m <= 16) {
            fold_whole_tiles(s, b, first, count, best, block, ahead);
            continue;
        }
        int64_t next_item = 0, next_vector = 0; /* the next row, counted (no divisions in the loop) */
        for (int64_t r0 = 0; r0 < rows; r0 += RT) {
            const int valid_rows = rows - r0 < RT ? (int)(rows - r0) : RT;
            for (int r = 0; r < valid_rows; r++) {
                item[r] = next_item;
                row[r] = row_at(s, b, first + next_item, next_vector, size);
                if (I8) scales[r] = scale_at(s, b, first + next_item, next_vector);
                if (++next_vector == take) next_vector = 0, next_item++;
            }
            for (int r = valid_rows; r < RT; r++) { /* a short last tile repeats a row; its dots are ignored */
                item[r] = item[valid_rows - 1];
                row[r] = row[valid_rows - 1];
                scales[r] = scales[valid_rows - 1];
            }
            if (I8) row_scales = tile_scales(scales, RT);
            for (int64_t q0 = 0; q0 < m; q0 += QT) {
                const int valid_q = m - q0 < QT ? (int)(m - q0) : QT;
                for (int a = 0; a < QT; a++) query[a] = s->queries + (q0 + (a < valid_q ? a : valid_q - 1)) * dim * size;
                const __m512i offsets = I8 ? tile_offsets(s->query_offsets + q0, valid_q, RT) : _mm512_setzero_si512();
                const __m512 sims = tile(query, row, dim * size, QT, RT, q0 == 0 ? ahead : 0, ROWS_FIRST, I8, offsets,
                                         row_scales);
                if (item[0] == item[RT - 1]) { /* one item (padding repeats a row): max in registers first */
                    _mm512_storeu_ps(dots, max_over_rows(sims, RT));
                    for (int a = 0; a < valid_q; a++) {
                        float *at = best + (q0 + a) * block + item[0];
                        *at = larger(*at, dots[a * RT]);
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
                    for (int r = 0; r < valid_rows; r++) line[item[r]] = larger(line[item[r]], dots[a * RT + r]);
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
TARGET static inline __attribute__((always_inline)) int fold_by_item(const struct source *s, int64_t first,
                                                                     int64_t count, int64_t available, float *best,
                                                                     int64_t block) {
    const int64_t size = 2, m = s->m, dim = s->dim; /* bf16 only: int8 batches take the lanes order */
    int64_t per_item = 0;
    for (int64_t b = 0; b < s->nblocks; b++) per_item += s->takes[b];
    const int64_t item_bytes = per_item * dim * size;
    const int64_t fit = CHUNK_BYTES / item_bytes, chunk = fit < 1 ? 1 : fit;
    const int64_t distance = (PREFETCH_ITEM_BYTES + item_bytes - 1) / item_bytes; /* in items */
    const int64_t tiles = (per_item + 3) / 4;
    const char **rows = malloc(sizeof(*rows) * tiles * 4);
    int64_t *ahead = malloc(sizeof(*ahead) * tiles * 4); /* per row, then per tile */
    if (!rows || !ahead) {
        free(rows), free(ahead);
        return -1;
    }
    const __m512i unused = _mm512_setzero_si512(); /* int8's offsets and scales */
    for (int64_t c0 = 0; c0 < count; c0 += chunk) {
        const int64_t c1 = count - c0 < chunk ? count : c0 + chunk;
        for (int64_t q0 = 0; q0 < m; q0 += QUERY_CHUNK) {
            const int64_t q1 = m - q0 < QUERY_CHUNK ? m : q0 + QUERY_CHUNK;
            const int groups = (int)((q1 - q0 + 3) / 4);
            const char *query[QUERY_CHUNK]; /* a short last group repeats a vector; its maxima are not written */
            for (int v = 0; v < 4 * groups; v++) query[v] = s->queries + (q0 + v < q1 ? q0 + v : q1 - 1) * dim * size;
            for (int64_t i = c0; i < c1; i++) {
                int64_t r = 0;
                for (int64_t b = 0; b < s->nblocks; b++)
                    for (int64_t j = 0; j < s->takes[b]; j++, r++) {
                        rows[r] = row_at(s, b, first + i, j, size);
                        ahead[r] = s->index ? 0 : distance * s->item_strides[b] * size;
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
                        run[g] = _mm512_max_ps(run[g], tile(query + 4 * g, rows + 4 * t, dim * size, 4, 4, pf, 0, 0,
                                                            unused, _mm512_castsi512_ps(unused)));
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

/* int8 from LANES_MIN_M query vectors: the query vectors in the lanes instead of the dimensions. A run of query
 * vectors is packed into the 16 lanes, 4 codes (a word) per lane, and 4 codes of stored rows are broadcast across
 * the lanes, so one VPDPBUSD adds 4 products to 16 dot products at once: no horizontal sums at all, and the max over
 * an item's rows is a lane-wise max. P rows share a broadcast: from 16 query vectors P = 1 (each lane a query vector,
 * 16 per run); from 8 to 15, P = 2 (lane 2v + p: query vector v against the pair's row p, 8 per run), so a query of 8
 * vectors fills every lane. Integer sums make this order bit-identical to the tiles' (bf16 cannot take it: lane-wise
 * fp32 sums round differently from a lone query's tiles, and its batches ran 20-25 % slower in lanes than item by
 * item). LANE_ROWS rows at a time, 64 codes of each are flipped to code + 128 (VPDPBUSD's unsigned side) -- P rows'
 * words interleaved -- into a double buffer of fixed stride (every broadcast a constant offset; the next step is
 * written while the current one is read: a 4-byte load right after the 64-byte store it reads stalls). Items are
 * taken in chunks that stay in L2 while each run of query vectors passes over them. Returns 0, or -1 when out of
 * memory. */
#define LANES_MIN_M 8
#define LANE_ROWS 16

/* acc += the 4-byte dot products of unsigned a and signed b, in acc's register: GCC 12 copies the accumulators
 * around every VPDPBUSD the intrinsic issues in fold_lanes' loop (two extra moves per multiply-add). */
TARGET static inline void dpbusd_in_place(__m512i *acc, __m512i a, __m512i b) {
    __asm__("vpdpbusd %2, %1, %0" : "+v"(*acc) : "v"(a), "v"(b));
}

/* The word of a 64-code step that lane pair j of an interleaved row pair holds: UNPACKLO / UNPACKHI of two rows'
 * words leave pairs (w of row 0, w of row 1) in this order. */
static const int8_t PAIR_WORD[16] = {0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15};

/* 64 codes from offset k of LANE_ROWS rows (rows[at[t]]) into `to`, flipped to code + 128: row t at to + 64 t
 * (P = 1), or rows 2u and 2u + 1 word by word interleaved at to + 128 u (P = 2). Past a row's end, 128s meet zero
 * query words. Prefetches each row ahead[at[t]] bytes further on. */
TARGET static inline __attribute__((always_inline)) void flip_rows(uint8_t *to, const char *const *rows,
                                                                   const int64_t *at, const int64_t *ahead,
                                                                   int64_t k, int64_t bytes, const int P) {
    const __mmask64 mask = bytes - k >= 64 ? ~(__mmask64)0 : (__mmask64)((1ull << (bytes - k)) - 1);
    for (int t = 0; t < LANE_ROWS; t += P) {
        __m512i flipped[2];
        for (int p = 0; p < P; p++) {
            if (ahead[at[t + p]]) _mm_prefetch(rows[at[t + p]] + k + ahead[at[t + p]], _MM_HINT_T0);
            flipped[p] = row_bytes(_mm512_maskz_loadu_epi8(mask, rows[at[t + p]] + k), 1);
        }
        if (P == 1) {
            _mm512_store_si512(to + 64 * t, flipped[0]);
        } else {
            _mm512_store_si512(to + 64 * t, _mm512_unpacklo_epi32(flipped[0], flipped[1]));
            _mm512_store_si512(to + 64 * t + 64, _mm512_unpackhi_epi32(flipped[0], flipped[1]));
        }
    }
}

TARGET static inline __attribute__((always_inline)) int fold_lanes(const struct source *s, int64_t first,
                                                                   int64_t count, int64_t available, float *best,
                                                                   int64_t block, const int P) {
    const int per_run = 16 / P, accumulators = LANE_ROWS / P;
    const int64_t m = s->m, bytes = s->dim; /* one byte per code */
    const int64_t runs = (m + per_run - 1) / per_run, steps = (bytes + 63) / 64;
    int64_t per_item = 0;
    for (int64_t b = 0; b < s->nblocks; b++) per_item += s->takes[b];
    const int64_t item_bytes = per_item * bytes;
    const int64_t fit = CHUNK_BYTES / item_bytes, chunk = fit < 1 ? 1 : fit;
    const int64_t distance = (PREFETCH_ITEM_BYTES + item_bytes - 1) / item_bytes; /* in items */
    int32_t *packed = aligned_alloc(64, runs * steps * 16 * 64); /* [run][step][word slot][lane]; zeros past D, m */
    const char **rows = malloc(sizeof(*rows) * per_item);
    float *scales = malloc(sizeof(*scales) * per_item);
    int64_t *ahead = malloc(sizeof(*ahead) * per_item);
    if (!packed || !rows || !scales || !ahead) {
        free(packed), free(rows), free(scales), free(ahead);
        return -1;
    }
    for (int64_t run = 0; run < runs; run++)
        for (int64_t w = 0; w < steps * 16; w++)
            for (int lane = 0; lane < 16; lane++) {
                const int64_t v = run * per_run + lane / P, word = w / 16 * 16 + (P == 1 ? w % 16 : PAIR_WORD[w % 16]);
                uint32_t value = 0;
                for (int64_t k = 0; k < 4 && v < m && 4 * word + k < bytes; k++)
                    value |= (uint32_t)(uint8_t)s->queries[v * bytes + 4 * word + k] << (8 * k);
                packed[(run * steps * 16 + w) * 16 + lane] = (int32_t)value;
            }
    const __m512i lane_index = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i vector_of_lane = _mm512_srli_epi32(lane_index, P - 1);
    _Alignas(64) uint8_t flipped[2 * LANE_ROWS * 64];
    for (int64_t c0 = 0; c0 < count; c0 += chunk) {
        const int64_t c1 = count - c0 < chunk ? count : c0 + chunk;
        for (int64_t run = 0; run < runs; run++) {
            const int valid = m - per_run * run < per_run ? (int)(m - per_run * run) : per_run;
            const __m512i offsets = _mm512_permutexvar_epi32(
                vector_of_lane,
                _mm512_maskz_loadu_epi32((__mmask16)((1u << valid) - 1), s->query_offsets + per_run * run));
            const int32_t *query = packed + run * steps * 16 * 16;
            for (int64_t i = c0; i < c1; i++) {
                int64_t r = 0;
                for (int64_t b = 0; b < s->nblocks; b++)
                    for (int64_t j = 0; j < s->takes[b]; j++, r++) {
                        rows[r] = row_at(s, b, first + i, j, 1);
                        scales[r] = scale_at(s, b, first + i, j);
                        ahead[r] = s->index || run || i + distance >= available ? 0 : distance * s->item_strides[b];
                    }
                __m512 best_lanes = _mm512_set1_ps(-INFINITY);
                for (int64_t r0 = 0; r0 < per_item; r0 += LANE_ROWS) {
                    int64_t at[LANE_ROWS]; /* a short last group repeats its last row: the max is unchanged */
                    for (int t = 0; t < LANE_ROWS; t++) at[t] = r0 + t < per_item ? r0 + t : per_item - 1;
                    __m512i acc[LANE_ROWS];
                    for (int t = 0; t < accumulators; t++) acc[t] = _mm512_setzero_si512();
                    flip_rows(flipped, rows, at, ahead, 0, bytes, P);
                    for (int64_t step = 0; step < steps; step++) {
                        const uint8_t *current = flipped + (step % 2) * LANE_ROWS * 64;
                        if (step + 1 < steps)
                            flip_rows(flipped + ((step + 1) % 2) * LANE_ROWS * 64, rows, at, ahead, 64 * (step + 1),
                                      bytes, P);
                        const int32_t *words = query + step * 16 * 16;
                        for (int w = 0; w < 16; w++) {
                            const __m512i lanes = _mm512_load_si512(words + 16 * w);
                            for (int t = 0; t < accumulators; t++) {
                                __m512i broadcast;
                                if (P == 1) {
                                    int32_t word;
                                    __builtin_memcpy(&word, current + 64 * t + 4 * w, 4);
                                    broadcast = _mm512_set1_epi32(word);
                                } else {
                                    int64_t pair;
                                    __builtin_memcpy(&pair, current + 128 * t + 8 * w, 8);
                                    broadcast = _mm512_set1_epi64(pair);
                                }
                                dpbusd_in_place(&acc[t], broadcast, lanes);
                            }
                        }
                    }
                    for (int t = 0; t < accumulators; t++) {
                        __m512 row_scales; /* lane 2v + p: row p's scale (P = 2) */
                        if (P == 1) {
                            row_scales = _mm512_set1_ps(scales[at[t]]);
                        } else {
                            const float pair[2] = {scales[at[2 * t]], scales[at[2 * t + 1]]};
                            int64_t both;
                            __builtin_memcpy(&both, pair, 8);
                            row_scales = _mm512_castsi512_ps(_mm512_set1_epi64(both));
                        }
                        const __m512 dots = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[t], offsets));
                        best_lanes = _mm512_max_ps(best_lanes, _mm512_mul_ps(dots, row_scales));
                    }
                }
                if (P == 2) best_lanes = _mm512_max_ps(best_lanes, _mm512_permute_ps(best_lanes, 0xB1));
                float lanes[16];
                _mm512_storeu_ps(lanes, best_lanes);
                for (int v = 0; v < valid; v++) best[(per_run * run + v) * block + i] = lanes[P * v];
            }
        }
    }
    free(packed), free(rows), free(scales), free(ahead);
    return 0;
}

/* One block of items into best, in the loop order and tile shape that suits m query vectors. Returns 0, or -1 when
 * out of memory. */
TARGET static inline __attribute__((always_inline)) int fold_block(const struct source *s, int64_t first,
                                                                   int64_t count, int64_t available, float *best,
                                                                   int64_t block, const int I8) {
    int64_t per_item = 0;
    for (int64_t b = 0; b < s->nblocks; b++) per_item += s->takes[b];
    if (I8 && s->m >= LANES_MIN_M) /* a run fills the lanes: 16 query vectors, or 8 against row pairs */
        return s->m >= 16 ? fold_lanes(s, first, count, available, best, block, 1)
                          : fold_lanes(s, first, count, available, best, block, 2);
    if (!I8 && s->m >= BY_ITEM_MIN_M && (per_item % 4 == 0 || per_item >= 12)) /* at most 1 in 5 padding repeats */
        return fold_by_item(s, first, count, available, best, block);
    /* tile shapes keep 16 accumulators: one query vector x 16 rows, 2 x 8, or 4 x 4 */
    if (s->m == 1)
        fold_items(s, first, count, best, block, 1, 16, 1, I8);
    else if (s->m <= 3)
        fold_items(s, first, count, best, block, 2, 8, 1, I8);
    else if (s->m <= ROWS_FIRST_MAX_M)
        fold_items(s, first, count, best, block, 4, 4, 1, I8);
    else
        fold_items(s, first, count, best, block, 4, 4, 0, I8);
    return 0;
}

/* Scores of items [lo, hi) -- stored items index[lo..hi) when index is given, else items lo..hi:
 * scores[query][item] = sum over its r_q vectors of the best dot product (int8: times the query vector's scale).
 * Returns 0, or -1 when m is out of range or memory runs out. The row list only changes where each item's rows are
 * read: every dot product, max and sum is the same as for those items gathered into an array of their own, so the
 * scores are bit-identical. */
TARGET static inline __attribute__((always_inline)) int maxsim(const struct source *s, int64_t nq, int64_t r_q,
                                                               int64_t lo, int64_t hi, float *scores, int64_t n,
                                                               const int I8) {
    const int64_t m = s->m;
    if (m < 1 || m > MAX_QUERY_VECTORS) return -1;
    const int64_t fit = BEST_FLOATS / m, block = fit < MIN_BLOCK ? MIN_BLOCK : fit > MAX_BLOCK ? MAX_BLOCK : fit;
    float *best = malloc(sizeof(float) * m * block);
    if (!best) return -1;
    for (int64_t first = lo; first < hi; first += block) {
        const int64_t count = hi - first < block ? hi - first : block;
        for (int64_t i = 0; i < m * block; i++) best[i] = -INFINITY;
        if (fold_block(s, first, count, hi - first, best, block, I8)) {
            free(best);
            return -1;
        }
        for (int64_t q = 0; q < nq; q++) {
            float *out = scores + q * n + first;
            for (int64_t i = 0; i < count; i++) out[i] = 0.0f;
            for (int64_t v = 0; v < r_q; v++) {
                const float *line = best + (q * r_q + v) * block;
                if (I8) {
                    const float scale = s->query_scales[q * r_q + v];
                    for (int64_t i = 0; i < count; i++) out[i] += scale * line[i];
                } else {
                    for (int64_t i = 0; i < count; i++) out[i] += line[i];
                }
            }
        }
    }
    free(best);
    return 0;
}

TARGET int metaembed_maxsim_bf16(const uint16_t *queries, int64_t nq, int64_t r_q, int64_t dim, int64_t nblocks,
                                 const uint16_t *const *bases, const int64_t *takes, const int64_t *item_strides,
                                 int64_t lo, int64_t hi, float *scores, int64_t n) {
    const struct source s = {.queries = (const char *)queries, .m = nq * r_q, .dim = dim, .nblocks = nblocks,
                             .bases = (const char *const *)bases, .takes = takes, .item_strides = item_strides};
    return maxsim(&s, nq, r_q, lo, hi, scores, n, 0);
}

/* The same for a row list: column i of scores (nq, n) is stored item index[i], for i in [lo, hi) (any order,
 * repeats allowed; the caller checks every index is in range). Rescoring a shortlist reads its rows where they
 * lie instead of copying them out first. */
TARGET int metaembed_maxsim_bf16_rows(const uint16_t *queries, int64_t nq, int64_t r_q, int64_t dim, int64_t nblocks,
                                      const uint16_t *const *bases, const int64_t *takes,
                                      const int64_t *item_strides, const int64_t *index, int64_t lo, int64_t hi,
                                      float *scores, int64_t n) {
    const struct source s = {.queries = (const char *)queries, .m = nq * r_q, .dim = dim, .nblocks = nblocks,
                             .bases = (const char *const *)bases, .takes = takes, .item_strides = item_strides,
                             .index = index};
    return maxsim(&s, nq, r_q, lo, hi, scores, n, 0);
}

/* int8 candidates with per-vector scales against int8 query codes: query_offsets[v] = 128 * sum of vector v's
 * codes, query_scales[v] its scale. index: NULL, or a row list as above. */
TARGET int metaembed_maxsim_int8(const int8_t *queries, const int32_t *query_offsets, const float *query_scales,
                                 int64_t nq, int64_t r_q, int64_t dim, int64_t nblocks, const int8_t *const *bases,
                                 const float *const *scale_bases, const int64_t *takes, const int64_t *item_strides,
                                 const int64_t *scale_strides, const int64_t *index, int64_t lo, int64_t hi,
                                 float *scores, int64_t n) {
    const struct source s = {.queries = (const char *)queries, .query_offsets = query_offsets,
                             .query_scales = query_scales, .m = nq * r_q, .dim = dim, .nblocks = nblocks,
                             .bases = (const char *const *)bases, .scale_bases = scale_bases, .takes = takes,
                             .item_strides = item_strides, .scale_strides = scale_strides, .index = index};
    return maxsim(&s, nq, r_q, lo, hi, scores, n, 1);
}

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_fused_maxsim",
    .m_doc = "Fused bf16 / int8 MaxSim kernel, called through ctypes (see metaembed.fused).",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__fused_maxsim(void) { return PyModule_Create(&module); }
