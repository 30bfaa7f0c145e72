/* Sparse delta products for mixed-variant steps: the CPU implementation of the ops
 * deltaserve::spmm_add_ and deltaserve::rowgather_add_ (see kernels/__init__.py for the
 * layout, which this file reads as described there).
 *
 * A variant's delta lives in one int32 buffer: a header of HEADER int32 per matrix slot
 *   {rowptr offset (int32 units; 0: the variant leaves the matrix alone),
 *    cols offset (uint16 units), vals offset (units of the value type),
 *    value kind (0 bf16, 1 fp32), 1/q (fp32 bits), rows, entries, 0}
 * then, per matrix, CSR by output row: rowptr int32 [rows+1], cols uint16 [k], vals [k].
 * A call gets the step's variant buffers by address (bases) and its work items, 4 int64
 * each: {tok_start, tok_end, a, b}: tokens [tok_start, tok_end) get +delta of variant a
 * and -delta of variant b (indices into bases; -1: none).
 *
 *   spmm_add:      y[t, r] += scale * sum_e vals[e] * x[t, cols[e]]   over W's rows r
 *   rowgather_add: h[t, c] += scale * vals[e] for the entries e of row ids[t]
 *
 * Threads split W's rows in the same static ranges for every term, so terms may
 * overlap in tokens without races. A one-token term walks its rows with four partial
 * sums; a longer one reads x transposed (in x (N + 8), tokens contiguous, room for a
 * whole block past the last token) and keeps 8 tokens' sums per row in vectors. Where
 * the compiler targets AVX-512 (and DELTA_PORTABLE is not defined) a one-token term's
 * rows with bf16 values run vectorized (row_dot_bf16), four rows at a time. A call
 * with no entries to add returns at once, and a small one runs on the calling thread
 * (PARALLEL_WORK). The OpenMP runtime is torch's own (its libgomp is already loaded
 * when this library is, so both share one thread pool). x and y are both float32 or
 * both bfloat16; the kernel converts x to fp32 itself (row-major
 * and/or transposed, as the terms need) and rounds y back to nearest even. Returns 0,
 * -1 if it could not allocate its buffers, -2 for a malformed item.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && !defined(DELTA_PORTABLE)
#include <immintrin.h>
#define VECTOR_ROWS 1
/* one row's dot product over bf16 values (a one-token term: the decode case): masked
 * loads of the columns and values (a masked-off lane reads nothing, so no load runs
 * past a row's end) and a gather of x, 8 entries in one 256-bit step where the row has
 * no more (most rows at p = 0.99: ~6 entries per 576 inputs), else 16 per step. Against
 * the scalar walk (branches on each row's length, mispredicted as often as not) this
 * took one SmolLM2 layer's products for 16 one-token variants from 0.59 to 0.28 ms
 * here (AMD EPYC, 2 threads; the 512-bit gather alone: 0.40 ms). */
static inline float row_dot_bf16(const uint16_t *v, const uint16_t *cols, int32_t e,
                                 int32_t end, const float *xt) {
    if (end - e <= 8) {
        const __mmask8 m = (__mmask8)((1u << (end - e)) - 1u);
        const __m256i idx = _mm256_cvtepu16_epi32(_mm_maskz_loadu_epi16(m, cols + e));
        const __m256 xv = _mm256_mmask_i32gather_ps(_mm256_setzero_ps(), m, idx, xt, 4);
        const __m256i raw = _mm256_cvtepu16_epi32(_mm_maskz_loadu_epi16(m, v + e));
        const __m256 p = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_slli_epi32(raw, 16)), xv);
        const __m128 h = _mm_add_ps(_mm256_castps256_ps128(p), _mm256_extractf128_ps(p, 1));
        const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
        return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
    }
    __m512 acc = _mm512_setzero_ps();
    for (; e < end; e += 16) {
        const int32_t left = end - e;
        const __mmask16 m = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
        const __m512i idx = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, cols + e));
        const __m512 xv = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, idx, xt, 4);
        const __m512i raw = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, v + e));
        acc = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(raw, 16)), xv, acc);
    }
    return _mm512_reduce_add_ps(acc);
}
#else
#define VECTOR_ROWS 0
#endif

#define HEADER 8
/* below this many multiply-adds a product runs on the calling thread: waking the
 * OpenMP team costs more than it saves */
#define PARALLEL_WORK 32768

typedef struct {
    int64_t t0, t1;
    const int32_t *rowptr;
    const uint16_t *cols;
    const void *vals;
    int64_t f32;
    float scale;
} Seg;

static inline float bf2f(uint16_t b) { uint32_t u = (uint32_t)b << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t f2bf(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
static inline float val(const Seg *g, int64_t e) {
    return g->f32 ? ((const float *)g->vals)[e] : bf2f(((const uint16_t *)g->vals)[e]);
}

/* The terms of the items for matrix `slot`, resolved through each variant's header
 * (a variant that leaves the matrix alone adds none). Returns their count, or -1 for
 * an item that names a variant outside bases. */
static int64_t resolve(Seg *segs, const int64_t *bases, int64_t nbases, const int64_t *items,
                       int64_t nitems, int64_t slot) {
    int64_t s = 0;
    for (int64_t i = 0; i < nitems; i++) {
        const int64_t *it = items + 4 * i;
        for (int term = 0; term < 2; term++) {
            const int64_t v = it[2 + term];
            if (v < 0) continue;
            if (v >= nbases) return -1;
            const int32_t *buf = (const int32_t *)(intptr_t)bases[v];
            const int32_t *hd = buf + HEADER * slot;
            if (hd[0] == 0) continue;
            float scale; memcpy(&scale, &hd[4], 4);
            Seg *g = &segs[s++];
            g->t0 = it[0];
            g->t1 = it[1];
            g->rowptr = buf + hd[0];
            g->cols = (const uint16_t *)buf + hd[1];
            g->f32 = hd[3];
            g->vals = hd[3] ? (const void *)((const float *)buf + hd[2])
                            : (const void *)((const uint16_t *)buf + hd[2]);
            g->scale = term ? -scale : scale;
        }
    }
    return s;
}

#ifdef _OPENMP
#define SPLIT(nth, me) do { nth = omp_get_num_threads(); me = omp_get_thread_num(); } while (0)
#else
#define SPLIT(nth, me) do { } while (0)
#endif

/* a term run token by token (row-major x) rather than in blocks of tokens (xT): one
 * token; with the vectorized rows, up to BY_TOKEN_MAX tokens of bf16 values (a few
 * decode rows of one variant). One layer's products, alternated with the portable
 * build here (`python -m benchmarks.mixed --kernel-layer`): token by token takes 0.5x
 * the time of the blocks at two tokens, 0.9x at three, 1.15x at four, 1.8x at eight */
#define BY_TOKEN_MAX 3
#define BY_TOKEN(g) ((g)->t1 - (g)->t0 == 1 || \
                     (VECTOR_ROWS && !(g)->f32 && (g)->t1 - (g)->t0 <= BY_TOKEN_MAX))

#define BLOCK 8
#define ID(v) (v)
#define ADD_F32(dst, v) ((dst) += (v))
#define ADD_BF16(dst, v) ((dst) = f2bf(bf2f(dst) + (v)))

/* one token: a walk over rows [r0, r1), four partial sums per row (no FMA chain) */
#define ONE_TOKEN(T, STORE_ADD, VT, VLOAD, tok)                                   \
    {                                                                             \
        const float *xt = x + (tok) * ldx;                                        \
        T *yt = y + (tok) * ldy;                                                  \
        const VT *v = (const VT *)g->vals;                                        \
        const uint16_t *cols = g->cols;                                           \
        int32_t e = g->rowptr[r0];                                                \
        for (int64_t r = r0; r < r1; r++) {                                       \
            const int32_t end = g->rowptr[r + 1];                                 \
            if (e == end) continue;                                               \
            float a0 = 0, a1 = 0, a2 = 0, a3 = 0;                                 \
            for (; e + 4 <= end; e += 4) {                                        \
                a0 += VLOAD(v[e]) * xt[cols[e]];                                  \
                a1 += VLOAD(v[e + 1]) * xt[cols[e + 1]];                          \
                a2 += VLOAD(v[e + 2]) * xt[cols[e + 2]];                          \
                a3 += VLOAD(v[e + 3]) * xt[cols[e + 3]];                          \
            }                                                                     \
            for (; e < end; e++) a0 += VLOAD(v[e]) * xt[cols[e]];                 \
            STORE_ADD(yt[r], sc * ((a0 + a1) + (a2 + a3)));                       \
        }                                                                         \
    }

#if VECTOR_ROWS
/* four rows at a time: their gathers overlap; a row without entries keeps its bits */
#define ONE_TOKEN_VEC(T, STORE_ADD, tok)                                          \
    {                                                                             \
        const float *xt = x + (tok) * ldx;                                        \
        T *yt = y + (tok) * ldy;                                                  \
        const uint16_t *v = (const uint16_t *)g->vals;                            \
        const uint16_t *cols = g->cols;                                           \
        const int32_t *rp = g->rowptr;                                            \
        int64_t r = r0;                                                           \
        for (; r + 3 < r1; r += 4) {                                              \
            float d[4];                                                           \
            for (int j = 0; j < 4; j++)                                           \
                d[j] = row_dot_bf16(v, cols, rp[r + j], rp[r + j + 1], xt);       \
            for (int j = 0; j < 4; j++)                                           \
                if (rp[r + j] != rp[r + j + 1]) STORE_ADD(yt[r + j], sc * d[j]);  \
        }                                                                         \
        for (; r < r1; r++)                                                       \
            if (rp[r] != rp[r + 1])                                               \
                STORE_ADD(yt[r], sc * row_dot_bf16(v, cols, rp[r], rp[r + 1], xt)); \
    }
#else
#define ONE_TOKEN_VEC(T, STORE_ADD, tok) ONE_TOKEN(T, STORE_ADD, uint16_t, bf2f, tok)
#endif

/* several tokens: per row, BLOCK tokens at a time from xT, two vector sums per block */
#define MULTI_TOKEN(T, STORE_ADD, VT, VLOAD)                                             \
    {                                                                                    \
        const VT *v = (const VT *)g->vals;                                               \
        const uint16_t *cols = g->cols;                                                  \
        for (int64_t r = r0; r < r1; r++) {                                              \
            const int32_t e0 = g->rowptr[r], e1 = g->rowptr[r + 1];                      \
            if (e0 == e1) continue;                                                      \
            for (int64_t tb = g->t0; tb < g->t1; tb += BLOCK) {                          \
                const int64_t nb = (g->t1 - tb) < BLOCK ? (g->t1 - tb) : BLOCK;          \
                float a[BLOCK] = {0}, b[BLOCK] = {0};                                    \
                int32_t e = e0;                                                          \
                for (; e + 2 <= e1; e += 2) {                                            \
                    const float va = VLOAD(v[e]), vb = VLOAD(v[e + 1]);                  \
                    const float *xa = xT + cols[e] * ldxT + tb;                          \
                    const float *xb = xT + cols[e + 1] * ldxT + tb;                      \
                    for (int j = 0; j < BLOCK; j++) a[j] += va * xa[j];                  \
                    for (int j = 0; j < BLOCK; j++) b[j] += vb * xb[j];                  \
                }                                                                        \
                if (e < e1) {                                                            \
                    const float va = VLOAD(v[e]);                                        \
                    const float *xa = xT + cols[e] * ldxT + tb;                          \
                    for (int j = 0; j < BLOCK; j++) a[j] += va * xa[j];                  \
                }                                                                        \
                for (int64_t j = 0; j < nb; j++)                                         \
                    STORE_ADD(y[(tb + j) * ldy + r], sc * (a[j] + b[j]));                \
            }                                                                            \
        }                                                                                \
    }

#define SPMM_BODY(T, STORE_ADD)                                                           \
    _Pragma("omp parallel if (work >= PARALLEL_WORK)")                                    \
    {                                                                                     \
        int64_t nth = 1, me = 0;                                                          \
        SPLIT(nth, me);                                                                   \
        const int64_t r0 = out * me / nth, r1 = out * (me + 1) / nth;                     \
        for (int64_t s = 0; s < nseg; s++) {                                              \
            const Seg *g = &segs[s];                                                      \
            const float sc = g->scale;                                                    \
            if (BY_TOKEN(g) || !xT) {                                                     \
                for (int64_t t = g->t0; t < g->t1; t++) {                                 \
                    if (g->f32) ONE_TOKEN(T, STORE_ADD, float, ID, t)                     \
                    else if (VECTOR_ROWS) ONE_TOKEN_VEC(T, STORE_ADD, t)                  \
                    else ONE_TOKEN(T, STORE_ADD, uint16_t, bf2f, t)                       \
                }                                                                         \
                continue;                                                                 \
            }                                                                             \
            if (g->f32) MULTI_TOKEN(T, STORE_ADD, float, ID)                              \
            else MULTI_TOKEN(T, STORE_ADD, uint16_t, bf2f)                                \
        }                                                                                 \
    }

/* the terms of this matrix; x (N, in) as T -> xf (N, in) fp32 row-major for one-token
 * terms, and xT (in, N + 8) fp32 with tokens contiguous for longer ones; the products */
#define SPMM_ENTRY(T, LOADX, STORE_ADD)                                                   \
    Seg stack_segs[64];                                                                   \
    Seg *segs = nitems <= 32 ? stack_segs : (Seg *)malloc(sizeof(Seg) * 2 * nitems);      \
    if (!segs) return -1;                                                                 \
    const int64_t nseg = resolve(segs, bases, nbases, items, nitems, slot);               \
    if (nseg < 0) { if (segs != stack_segs) free(segs); return -2; }                      \
    int single = 0, multi = 0;                                                            \
    int64_t work = 0; /* multiply-adds: threads only where they pay for waking */         \
    for (int64_t s = 0; s < nseg; s++) {                                                  \
        if (BY_TOKEN(&segs[s])) single = 1;                                               \
        else if (segs[s].t1 - segs[s].t0 > 1) multi = 1;                                  \
        work += (int64_t)(segs[s].rowptr[out] - segs[s].rowptr[0]) * (segs[s].t1 - segs[s].t0); \
    }                                                                                     \
    if (work == 0) { if (segs != stack_segs) free(segs); return 0; }                      \
    float *xf_buf = NULL, *xT = NULL;                                                     \
    const float *x = NULL;                                                                \
    const int64_t ldxT = n + BLOCK;                                                       \
    if (single) {                                                                         \
        if (sizeof(T) == sizeof(float)) x = (const float *)xin;                           \
        else {                                                                            \
            xf_buf = (float *)malloc(sizeof(float) * n * in);                             \
            if (!xf_buf) { if (segs != stack_segs) free(segs); return -1; }               \
            for (int64_t t = 0; t < n; t++)                                               \
                for (int64_t c = 0; c < in; c++) xf_buf[t * in + c] = LOADX(xin[t * ldxin + c]); \
            x = xf_buf;                                                                   \
        }                                                                                 \
    }                                                                                     \
    const int64_t ldx = (single && sizeof(T) == sizeof(float)) ? ldxin : in;              \
    if (multi) {                                                                          \
        xT = (float *)malloc(sizeof(float) * in * ldxT);                                  \
        if (!xT) { free(xf_buf); if (segs != stack_segs) free(segs); return -1; }         \
        for (int64_t t = 0; t < n; t++)                                                   \
            for (int64_t c = 0; c < in; c++) xT[c * ldxT + t] = LOADX(xin[t * ldxin + c]); \
    }                                                                                     \
    SPMM_BODY(T, STORE_ADD)                                                               \
    free(xf_buf);                                                                         \
    free(xT);                                                                             \
    if (segs != stack_segs) free(segs);                                                   \
    return 0;

int spmm_add_f32(float *y, int64_t ldy, const float *xin, int64_t ldxin, int64_t n, int64_t in,
                 int64_t out, const int64_t *bases, int64_t nbases, const int64_t *items,
                 int64_t nitems, int64_t slot) {
    SPMM_ENTRY(float, ID, ADD_F32)
}

int spmm_add_bf16(uint16_t *y, int64_t ldy, const uint16_t *xin, int64_t ldxin, int64_t n,
                  int64_t in, int64_t out, const int64_t *bases, int64_t nbases,
                  const int64_t *items, int64_t nitems, int64_t slot) {
    SPMM_ENTRY(uint16_t, bf2f, ADD_BF16)
}

#define ROWGATHER_ENTRY(STORE_ADD)                                                       \
    Seg stack_segs[64];                                                                  \
    Seg *segs = nitems <= 32 ? stack_segs : (Seg *)malloc(sizeof(Seg) * 2 * nitems);     \
    if (!segs) return -1;                                                                \
    const int64_t nseg = resolve(segs, bases, nbases, items, nitems, slot);              \
    if (nseg < 0) { if (segs != stack_segs) free(segs); return -2; }                     \
    for (int64_t s = 0; s < nseg; s++) {                                                 \
        const Seg *g = &segs[s];                                                         \
        const float sc = g->scale;                                                       \
        for (int64_t t = g->t0; t < g->t1; t++) {                                        \
            const int64_t row = ids[t];                                                  \
            for (int32_t e = g->rowptr[row]; e < g->rowptr[row + 1]; e++)                \
                STORE_ADD(h[t * ldh + g->cols[e]], sc * val(g, e));                      \
        }                                                                                \
    }                                                                                    \
    if (segs != stack_segs) free(segs);                                                  \
    return 0;

int rowgather_add_f32(float *h, int64_t ldh, const int64_t *ids, const int64_t *bases,
                      int64_t nbases, const int64_t *items, int64_t nitems, int64_t slot) {
    ROWGATHER_ENTRY(ADD_F32)
}

int rowgather_add_bf16(uint16_t *h, int64_t ldh, const int64_t *ids, const int64_t *bases,
                       int64_t nbases, const int64_t *items, int64_t nitems, int64_t slot) {
    ROWGATHER_ENTRY(ADD_BF16)
}

/* The dense product of a decode step: y (M, N) = x (M, K) @ w (N, K)^T (+ bias), all
 * bf16, fp32 accumulation, y rounded to nearest even once, for the few rows a decode
 * step has. The weights are the model's resident rows as they are (row-major, the
 * layout the in-place merges write): no packed copy to keep in step with a merge.
 *
 * A decode step reads every weight once for a handful of rows, so it is bound by the
 * memory's read rate; a general GEMM (oneDNN's, through torch) reached 7-12 GB/s on
 * those shapes here against 28 GB/s for a plain read (BENCHMARKS.md). Here each
 * thread takes a static range of W's rows and keeps the x rows' dot products with
 * them in AVX512-BF16 accumulators (VDPBF16PS: 32 products a step), so each weight is
 * read from memory once and used for every x row from registers; x stays in L1/L2.
 * Up to DENSE_ROWWISE x rows, one W row at a time (one stream of W per thread: two
 * rows read side by side streamed from memory at a third of a plain read's rate);
 * past that, two W rows at a time with up to 8 x rows per block (blocks of 8 over the
 * same W rows, then in L1), which keeps more sums per weight loaded. Built only where
 * the compiler targets AVX512-BF16; elsewhere linear_bf16 says so (returns -3) and the
 * caller runs torch's GEMM. */
#if defined(__AVX512BF16__) && defined(__AVX512BW__) && !defined(DELTA_PORTABLE)
#define DENSE_BF16 1
#define DENSE_MB 8 /* x rows per block: 2 W rows x 8 = 16 accumulators */
#ifndef DENSE_AHEAD
#define DENSE_AHEAD 4 /* W rows read ahead of the pair in use */
#endif

static inline __m512bh ld_bh(const uint16_t *p, __mmask32 m) {
    return (__m512bh)_mm512_maskz_loadu_epi16(m, p);
}

/* the sums of 16 vectors' lanes, in one vector (lane j: the sum of a[j]'s lanes), by a
 * tree of shuffles and adds (15 adds, not 16 reductions of 4 each) */
static inline __m512 reduce16(const __m512 *a) {
    __m512 b[8], c[4], d[2];
    for (int j = 0; j < 8; j++) /* 128-bit lanes: {a2j: 2 partials, a2j+1: 2 partials} */
        b[j] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * j], a[2 * j + 1]),
                             _mm512_unpackhi_ps(a[2 * j], a[2 * j + 1]));
    for (int j = 0; j < 4; j++) { /* 128-bit lanes: one partial of a4j .. a4j+3 */
        const __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(b[2 * j]), _mm512_castps_pd(b[2 * j + 1]));
        const __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(b[2 * j]), _mm512_castps_pd(b[2 * j + 1]));
        c[j] = _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
    }
    for (int j = 0; j < 2; j++) /* 128-bit lanes: c2j (0+1, 2+3), c2j+1 (0+1, 2+3) */
        d[j] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * j], c[2 * j + 1], 0x88),
                             _mm512_shuffle_f32x4(c[2 * j], c[2 * j + 1], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(d[0], d[1], 0x88),
                         _mm512_shuffle_f32x4(d[0], d[1], 0xDD));
}

/* y[m0 .. m0 + mb) at W rows n, n + 1 (w0, w1) */
static inline __attribute__((always_inline)) void dense_pair(
    uint16_t *y, int64_t ldy, const uint16_t *x, int64_t ldx, int64_t m0, const int mb,
    int64_t K, const uint16_t *w0, const uint16_t *w1, int64_t ldw, const uint16_t *bias,
    int64_t n, int prefetch) {
    const int64_t kfull = K & ~(int64_t)31;
    const __mmask32 tail = (__mmask32)((K & 31) ? ((1u << (K & 31)) - 1u) : 0u);
    __m512 a0[DENSE_MB], a1[DENSE_MB];
    for (int i = 0; i < mb; i++) { a0[i] = _mm512_setzero_ps(); a1[i] = _mm512_setzero_ps(); }
    int64_t k = 0;
    for (; k < kfull; k += 32) {
        if (prefetch) { /* the pair DENSE_AHEAD rows on: in cache when its turn comes */
            _mm_prefetch((const char *)(w0 + DENSE_AHEAD * ldw + k), _MM_HINT_T0);
            _mm_prefetch((const char *)(w1 + DENSE_AHEAD * ldw + k), _MM_HINT_T0);
        }
        const __m512bh v0 = (__m512bh)_mm512_loadu_si512(w0 + k);
        const __m512bh v1 = (__m512bh)_mm512_loadu_si512(w1 + k);
        for (int i = 0; i < mb; i++) {
            const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + (m0 + i) * ldx + k);
            a0[i] = _mm512_dpbf16_ps(a0[i], v0, xv);
            a1[i] = _mm512_dpbf16_ps(a1[i], v1, xv);
        }
    }
    if (tail) {
        const __m512bh v0 = ld_bh(w0 + k, tail), v1 = ld_bh(w1 + k, tail);
        for (int i = 0; i < mb; i++) {
            const __m512bh xv = ld_bh(x + (m0 + i) * ldx + k, tail);
            a0[i] = _mm512_dpbf16_ps(a0[i], v0, xv);
            a1[i] = _mm512_dpbf16_ps(a1[i], v1, xv);
        }
    }
    __m512 acc[16];
    for (int i = 0; i < DENSE_MB; i++) {
        acc[2 * i] = i < mb ? a0[i] : _mm512_setzero_ps();
        acc[2 * i + 1] = i < mb ? a1[i] : _mm512_setzero_ps();
    }
    __m512 sums = reduce16(acc); /* lanes 2i, 2i + 1: x row m0 + i with W rows n, n + 1 */
    if (bias) {
        const uint32_t pair = (uint32_t)bias[n] | ((uint32_t)bias[n + 1] << 16);
        const __m512i b = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_set1_epi32((int)pair)), 16);
        sums = _mm512_add_ps(sums, _mm512_castsi512_ps(b));
    }
    uint32_t out[8];
    _mm256_storeu_si256((__m256i *)out, (__m256i)_mm512_cvtneps_pbh(sums));
    for (int i = 0; i < mb; i++) memcpy(y + (m0 + i) * ldy + n, out + i, 4);
}

/* y[m0 .. m0 + mb) at W row n: one stream of W, up to 16 x rows' sums */
static inline __attribute__((always_inline)) void dense_row(
    uint16_t *y, int64_t ldy, const uint16_t *x, int64_t ldx, int64_t m0, const int mb,
    int64_t K, const uint16_t *w0, int64_t ldw, const uint16_t *bias, int64_t n) {
    const int64_t kfull = K & ~(int64_t)31;
    const __mmask32 tail = (__mmask32)((K & 31) ? ((1u << (K & 31)) - 1u) : 0u);
    __m512 a[16];
    for (int i = 0; i < 16; i++) a[i] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k < kfull; k += 32) {
        _mm_prefetch((const char *)(w0 + DENSE_AHEAD * ldw + k), _MM_HINT_T0);
        const __m512bh v0 = (__m512bh)_mm512_loadu_si512(w0 + k);
        for (int i = 0; i < mb; i++)
            a[i] = _mm512_dpbf16_ps(a[i], v0, (__m512bh)_mm512_loadu_si512(x + (m0 + i) * ldx + k));
    }
    if (tail) {
        const __m512bh v0 = ld_bh(w0 + k, tail);
        for (int i = 0; i < mb; i++)
            a[i] = _mm512_dpbf16_ps(a[i], v0, ld_bh(x + (m0 + i) * ldx + k, tail));
    }
    __m512 sums = reduce16(a); /* lane i: x row m0 + i */
    if (bias) sums = _mm512_add_ps(sums, _mm512_set1_ps(bf2f(bias[n])));
    uint16_t out[16];
    _mm256_storeu_si256((__m256i *)out, (__m256i)_mm512_cvtneps_pbh(sums));
    for (int i = 0; i < mb; i++) y[(m0 + i) * ldy + n] = out[i];
}

#ifndef DENSE_ROWWISE
#define DENSE_ROWWISE 12 /* up to this many x rows: one W row at a time (BENCHMARKS.md) */
#endif

/* rows [n0, n1) of y: each pair of W rows read from memory once, for every x row */
static void dense_rows(uint16_t *y, int64_t ldy, const uint16_t *x, int64_t ldx, int64_t M,
                       int64_t K, const uint16_t *w, int64_t ldw, const uint16_t *bias,
                       int64_t n0, int64_t n1) {
    int64_t n = n0;
    if (M <= DENSE_ROWWISE) { /* one W row at a time, every x row in one block */
        for (; n < n1; n++) {
            const uint16_t *w0 = w + n * ldw;
            switch ((int)M) {
#define ROW(c) case c: dense_row(y, ldy, x, ldx, 0, c, K, w0, ldw, bias, n); break;
            ROW(16) ROW(15) ROW(14) ROW(13) ROW(12) ROW(11) ROW(10) ROW(9)
            ROW(8) ROW(7) ROW(6) ROW(5) ROW(4) ROW(3) ROW(2)
            default: dense_row(y, ldy, x, ldx, 0, 1, K, w0, ldw, bias, n); break;
#undef ROW
            }
        }
        return;
    }
    for (; n + 1 < n1; n += 2) {
        const uint16_t *w0 = w + n * ldw, *w1 = w0 + ldw;
        for (int64_t m0 = 0; m0 < M; m0 += DENSE_MB) {
            const int first = m0 == 0; /* later blocks find the pair in L1 */
            switch (M - m0 >= DENSE_MB ? DENSE_MB : (int)(M - m0)) { /* constant mb: unrolled */
            case 8: dense_pair(y, ldy, x, ldx, m0, 8, K, w0, w1, ldw, bias, n, first); break;
            case 7: dense_pair(y, ldy, x, ldx, m0, 7, K, w0, w1, ldw, bias, n, first); break;
            case 6: dense_pair(y, ldy, x, ldx, m0, 6, K, w0, w1, ldw, bias, n, first); break;
            case 5: dense_pair(y, ldy, x, ldx, m0, 5, K, w0, w1, ldw, bias, n, first); break;
            case 4: dense_pair(y, ldy, x, ldx, m0, 4, K, w0, w1, ldw, bias, n, first); break;
            case 3: dense_pair(y, ldy, x, ldx, m0, 3, K, w0, w1, ldw, bias, n, first); break;
            case 2: dense_pair(y, ldy, x, ldx, m0, 2, K, w0, w1, ldw, bias, n, first); break;
            default: dense_pair(y, ldy, x, ldx, m0, 1, K, w0, w1, ldw, bias, n, first); break;
            }
        }
    }
    if (n < n1) { /* an odd row at the end of the range */
        const uint16_t *w0 = w + n * ldw;
        const __mmask32 tail = (__mmask32)((K & 31) ? ((1u << (K & 31)) - 1u) : 0u);
        for (int64_t m = 0; m < M; m++) {
            __m512 acc = _mm512_setzero_ps();
            for (int64_t k = 0; k < K; k += 32) {
                const __mmask32 mk = K - k >= 32 ? (__mmask32)0xFFFFFFFFu : tail;
                acc = _mm512_dpbf16_ps(acc, ld_bh(w0 + k, mk), ld_bh(x + m * ldx + k, mk));
            }
            y[m * ldy + n] = f2bf(_mm512_reduce_add_ps(acc) + (bias ? bf2f(bias[n]) : 0.0f));
        }
    }
}
#else
#define DENSE_BF16 0
#endif

/* 1 where linear_bf16 runs here, 0 where it returns -3 */
int linear_bf16_available(void) { return DENSE_BF16; }

/* W rows a thread takes at a time: blocks of 64 rows keep each thread's reads in
 * long runs */
#define DENSE_CHUNK 64

int linear_bf16(uint16_t *y, int64_t ldy, const uint16_t *x, int64_t ldx, int64_t M,
                int64_t K, const uint16_t *w, int64_t ldw, int64_t N, const uint16_t *bias) {
#if DENSE_BF16
    if (M <= 0 || N <= 0) return 0;
    const int64_t work = M * K * N, chunks = (N + DENSE_CHUNK - 1) / DENSE_CHUNK;
    _Pragma("omp parallel if (work >= PARALLEL_WORK)")
    {
        int64_t nth = 1, me = 0;
#ifdef _OPENMP
        SPLIT(nth, me);
#endif
        /* contiguous ranges of whole chunks, as even as the chunks allow */
        const int64_t c0 = chunks * me / nth, c1 = chunks * (me + 1) / nth;
        const int64_t n0 = c0 * DENSE_CHUNK, n1 = c1 * DENSE_CHUNK < N ? c1 * DENSE_CHUNK : N;
        if (n0 < n1) dense_rows(y, ldy, x, ldx, M, K, w, ldw, bias, n0, n1);
    }
    return 0;
#else
    (void)y; (void)ldy; (void)x; (void)ldx; (void)M; (void)K; (void)w; (void)ldw; (void)N;
    (void)bias;
    return -3;
#endif
}

/* Decode attention: each decode row's query heads against its own KV slot, read where
 * it lies in the cache (no gather of the rows' keys and values into a batch, no mask
 * over the longest row), written into the row's place in the output.
 *
 *   out[idx[b], h*D:(h+1)*D] = softmax(scale * q[idx[b], h] . k[slot_b, h/g, s:L]) @ v[...]
 *
 * for the positions [s, L) of row b (L = lens[b]; s = L - window with a window, else 0),
 * each of the g query heads that share a kv head. One task per (row, kv head): scores
 * 16 positions at a time as bf16 dot products (VDPBF16PS) summed by reduce16, a softmax
 * in fp32 (exp by scalef and a polynomial), then the values weighted in fp32; the output
 * rounded to bf16 once. Only the positions a row attends to are read. Built where the
 * dense path is (AVX512-BF16); elsewhere returns -3 and the caller runs SDPA. */
#if DENSE_BF16
static inline __m512 exp512(__m512 x) { /* e^x for x <= 0 (to within 2 ulp; 0 below -87) */
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

#define ATT_MAX_G 16 /* query heads per kv head the kernel takes */

static void attend_one(uint16_t *o, const uint16_t *q, int64_t qh_stride, const uint16_t *k,
                       const uint16_t *v, int64_t pos_stride, int64_t s, int64_t L, int g,
                       int64_t D, float scale, float *sc, float *acc) {
    const int64_t n = L - s, chunks = (D + 31) / 32;
    const __mmask32 dtail = (__mmask32)((D & 31) ? ((1u << (D & 31)) - 1u) : 0xFFFFFFFFu);
    for (int j = 0; j < g; j++) {
        const uint16_t *qj = q + j * qh_stride;
        float *sj = sc + j * n;
        __m512bh qv[8]; /* D <= 256 */
        for (int64_t c = 0; c < chunks; c++)
            qv[c] = ld_bh(qj + 32 * c, c == chunks - 1 ? dtail : (__mmask32)0xFFFFFFFFu);
        for (int64_t l0 = 0; l0 < n; l0 += 16) {
            const int m = n - l0 >= 16 ? 16 : (int)(n - l0);
            __m512 a[16];
            for (int i = 0; i < 16; i++) {
                a[i] = _mm512_setzero_ps();
                if (i < m) {
                    const uint16_t *kr = k + (s + l0 + i) * pos_stride;
                    for (int64_t c = 0; c < chunks; c++)
                        a[i] = _mm512_dpbf16_ps(
                            a[i], ld_bh(kr + 32 * c, c == chunks - 1 ? dtail : (__mmask32)0xFFFFFFFFu),
                            qv[c]);
                }
            }
            const __m512 sum = _mm512_mul_ps(reduce16(a), _mm512_set1_ps(scale));
            _mm512_mask_storeu_ps(sj + l0, (__mmask16)((1u << m) - 1u), sum);
        }
        /* softmax over sj[0, n) */
        __m512 mx = _mm512_set1_ps(-3.0e38f);
        for (int64_t l = 0; l < n; l += 16) {
            const __mmask16 mk = n - l >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - l)) - 1u);
            mx = _mm512_mask_max_ps(mx, mk, mx, _mm512_maskz_loadu_ps(mk, sj + l));
        }
        const __m512 mxv = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
        __m512 tot = _mm512_setzero_ps();
        for (int64_t l = 0; l < n; l += 16) {
            const __mmask16 mk = n - l >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - l)) - 1u);
            const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, sj + l), mxv));
            tot = _mm512_mask_add_ps(tot, mk, tot, e);
            _mm512_mask_storeu_ps(sj + l, mk, e);
        }
        const float inv = 1.0f / _mm512_reduce_add_ps(tot);
        /* out = sum_l p_l v_l */
        for (int64_t d = 0; d < D; d++) acc[d] = 0.0f;
        for (int64_t l = 0; l < n; l++) {
            const __m512 p = _mm512_set1_ps(sj[l] * inv);
            const uint16_t *vr = v + (s + l) * pos_stride;
            for (int64_t d = 0; d < D; d += 16) {
                const __mmask16 mk = D - d >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (D - d)) - 1u);
                const __m512 vv = _mm512_castsi512_ps(
                    _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, vr + d)), 16));
                _mm512_mask_storeu_ps(acc + d, mk,
                                      _mm512_fmadd_ps(p, vv, _mm512_maskz_loadu_ps(mk, acc + d)));
            }
        }
        uint16_t *oj = o + j * D;
        for (int64_t d = 0; d < D; d += 16) {
            const __mmask16 mk = D - d >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (D - d)) - 1u);
            const __m256i r = (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mk, acc + d));
            _mm256_mask_storeu_epi16(oj + d, mk, r);
        }
    }
}
#endif

/* out (N, H*D) rows idx[b] <- attention of q (N, H, D) rows idx[b] over kc/vc (slots, Hkv,
 * max_len, D: strides slot_stride, head_stride, D) of slot slots[b], positions up to
 * lens[b] (the last `window` of them if window > 0). Returns 0, -1 if it could not
 * allocate, -2 for a shape it does not take (D > 256, more than ATT_MAX_G query heads
 * per kv head), -3 where it is not built. */
int decode_attention_bf16(uint16_t *out, int64_t ldo, const uint16_t *q, int64_t ldq,
                          const uint16_t *kc, const uint16_t *vc, int64_t slot_stride,
                          int64_t head_stride, const int64_t *idx, const int64_t *slots,
                          const int64_t *lens, int64_t B, int64_t Hkv, int64_t g, int64_t D,
                          int64_t window, float scale) {
#if DENSE_BF16
    if (D > 256 || g > ATT_MAX_G || g < 1) return -2;
    if (B <= 0) return 0;
    int64_t longest = 0;
    for (int64_t b = 0; b < B; b++) longest = lens[b] > longest ? lens[b] : longest;
    const int parallel = B * Hkv * longest * D * g >= PARALLEL_WORK;
    int threads = 1;
#ifdef _OPENMP
    if (parallel) threads = omp_get_max_threads();
#endif
    /* per thread: g rows of scores (one per query head) and D sums */
    const int64_t per = g * longest + 16 + 256;
    float *buf = malloc(sizeof(float) * (size_t)(per * threads));
    if (!buf) return -1;
    _Pragma("omp parallel if (parallel)")
    {
        int me = 0;
#ifdef _OPENMP
        me = omp_get_thread_num();
#endif
        float *sc = buf + per * me, *acc = sc + g * longest + 16;
        _Pragma("omp for schedule(static)")
        for (int64_t t = 0; t < B * Hkv; t++) {
            const int64_t b = t / Hkv, h = t % Hkv, L = lens[b];
            const int64_t s = window > 0 && L > window ? L - window : 0;
            if (L <= 0) continue;
            const uint16_t *qr = q + idx[b] * ldq + h * g * D;
            const int64_t base = slots[b] * slot_stride + h * head_stride;
            attend_one(out + idx[b] * ldo + h * g * D, qr, D, kc + base, vc + base, D, s, L,
                       (int)g, D, scale, sc, acc);
        }
    }
    free(buf);
    return 0;
#else
    (void)out; (void)ldo; (void)q; (void)ldq; (void)kc; (void)vc; (void)slot_stride;
    (void)head_stride; (void)idx; (void)slots; (void)lens; (void)B; (void)Hkv; (void)g;
    (void)D; (void)window; (void)scale;
    return -3;
#endif
}
