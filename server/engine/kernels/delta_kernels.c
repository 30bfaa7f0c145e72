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
