/* Products of float32, float16, bfloat16 or int8 weights with a few float32 rows, for ibllm's CPU decode step
   (ibllm/llm/gemv.py says why). Built from this one file for the CPU at hand: -DIBLLM_AVX512 (16 floats a vector)
   or -DIBLLM_AVX2 (8), with -DIBLLM_BF16DP also AVX512-BF16's dot products for bfloat16 weights and rows. Each
   weight row is widened to float32 in registers and never written back: the product reads the weight's bytes once, which is all a product of a few rows needs to cost. Every output is summed in the same
   order whatever the number of rows, so a row's result does not depend on the rows beside it (a batched decode
   step gives each slot the values it would get alone). */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(IBLLM_AVX512)
#define W 16
typedef __m512 vec;
#define ZERO() _mm512_setzero_ps()
#define LOADX(p) _mm512_loadu_ps(p)
#define FMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define HSUM(v) _mm512_reduce_add_ps(v)
#define HALVES(p) _mm256_loadu_si256((const __m256i*)(p))
#define FROM_F16(p) _mm512_cvtph_ps(HALVES(p))
#define FROM_BF16(p) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(HALVES(p)), 16))
#define FROM_I8(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(p))))
#elif defined(IBLLM_AVX2)
#define W 8
typedef __m256 vec;
#define ZERO() _mm256_setzero_ps()
#define LOADX(p) _mm256_loadu_ps(p)
#define FMA(a, b, c) _mm256_fmadd_ps(a, b, c)
static inline float HSUM(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#define HALVES(p) _mm_loadu_si128((const __m128i*)(p))
#define FROM_F16(p) _mm256_cvtph_ps(HALVES(p))
#define FROM_BF16(p) _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(HALVES(p)), 16))
#define FROM_I8(p) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(p))))
#else
#error "build with -DIBLLM_AVX512 or -DIBLLM_AVX2"
#endif

enum { F16 = 0, BF16 = 1, I8 = 2, F32 = 3 }; /* element types: of the weight (all four), of x and y (F16, BF16, F32) */
#define NR 4 /* rows of the weight per pass (measured here: 2 was slower, 6 and 8 no faster) */
/* Rows of x per pass (the NR x MR sums stay in registers). Half and int8 weights: the Python side sends 1 or 2 rows
   (on a 2-core Xeon, 7B-sized matrices, 4 rows at once ran at half the rate of 2: widening and multiply-adds, not
   memory, became the limit). float32 weights need no widening: up to 8 rows, 4 a pass (measured on a 2-core EPYC:
   NR 4 x MR 4 the best of 4x2, 2x8 and 4x8). */
#define MR 4
#define PARALLEL_MIN (1 << 17) /* weight values from which a product is shared between threads */
/* Bytes ahead in a weight row to ask the cache for while multiplying: the hardware prefetcher alone left ~15 % of the
   read rate unused (measured here on 7B's matrices, one row of x: float16 21.7 -> 25.0 GB/s, int8 14.8 -> 16.8 GB/s;
   256 bytes gained half as much, 1024-2048 no more for float16 and less for int8). A prefetch past the end of the
   weight is harmless: it never faults. */
#define PREFETCH_AHEAD 512

static inline vec widen(const void* w, int64_t at, const int kind) {
  if (kind == F32) return LOADX((const float*)w + at);
  if (kind == I8) return FROM_I8((const int8_t*)w + at);
  const uint16_t* p = (const uint16_t*)w + at;
  return kind == BF16 ? FROM_BF16(p) : FROM_F16(p);
}

static inline const char* byte_at(const void* w, int64_t at, const int kind) {
  return (const char*)w + at * (kind == I8 ? 1 : kind == F32 ? 4 : 2);
}

static inline float widen1(const void* w, int64_t at, const int kind) {
  if (kind == F32) return ((const float*)w)[at];
  if (kind == I8) return (float)((const int8_t*)w)[at];
  uint16_t h = ((const uint16_t*)w)[at];
  if (kind == BF16) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
  }
  return _cvtsh_ss(h);
}

/* One output value in y's element type: float16 and bfloat16 rounded to nearest even, as torch rounds. */
static inline void store(void* y, int64_t at, float v, int kind) {
  if (kind == F32) {
    ((float*)y)[at] = v;
  } else if (kind == F16) {
    ((uint16_t*)y)[at] = _cvtss_sh(v, 0);
  } else {
    uint32_t u;
    memcpy(&u, &v, 4);
    ((uint16_t*)y)[at] = (u & 0x7fffffffu) > 0x7f800000u ? (uint16_t)((u >> 16) | 0x40)  /* NaN stays NaN */
                                                         : (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
  }
}

/* y[j, n + i] = scale[n + i] * sum_k x[j, k] w[n + i, k] + bias[n + i] for i < nr, j < mr (nr, mr, kind: constants
   where this is inlined); no scale: 1, no bias: 0. */
static inline __attribute__((always_inline)) void block(const void* w, const float* scale, const float* bias,
                                                        int64_t k_all, const float* x, int64_t ldx, void* y,
                                                        int y_kind, int64_t ldy, int64_t n, const int nr,
                                                        const int mr, const int kind) {
  vec acc[NR][MR];
  for (int i = 0; i < nr; i++)
    for (int j = 0; j < mr; j++) acc[i][j] = ZERO();
  int64_t k = 0;
  for (; k + W <= k_all; k += W) {
    vec xv[MR];
    for (int j = 0; j < mr; j++) xv[j] = LOADX(x + j * ldx + k);
    for (int i = 0; i < nr; i++) {
      _mm_prefetch(byte_at(w, (n + i) * k_all + k, kind) + PREFETCH_AHEAD, _MM_HINT_T0);
      vec wv = widen(w, (n + i) * k_all + k, kind);
      for (int j = 0; j < mr; j++) acc[i][j] = FMA(wv, xv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < nr; i++)
    for (int j = 0; j < mr; j++) {
      float s = HSUM(acc[i][j]);
      for (int64_t t = k; t < k_all; t++) s += widen1(w, (n + i) * k_all + t, kind) * x[j * ldx + t];
      if (scale) s *= scale[n + i];
      if (bias) s += bias[n + i];
      store(y, j * ldy + n + i, s, y_kind);
    }
}

#define B(r, nr, mr, kind) block(w, scale, bias, k_all, xf + m0 * k_all, k_all, (char*)y + m0 * ldy * ysize, y_kind, ldy, r, nr, mr, kind)
#define BY_ROWS(r, nr, kind)                                                                  \
  switch (mr) {                                                                                \
    case 1: B(r, nr, 1, kind); break;                                                          \
    case 2: B(r, nr, 2, kind); break;                                                          \
    case 3: B(r, nr, 3, kind); break;                                                          \
    default: B(r, nr, MR, kind);                                                               \
  }
/* All rows of x against weight rows r..r+nr: the block of w is read from memory once, then from cache. */
#define AT(r, nr)                                                                \
  for (int64_t m0 = 0; m0 < m; m0 += MR) {                                       \
    int mr = m - m0 < MR ? (int)(m - m0) : MR;                                   \
    switch (kind) {                                                              \
      case I8: BY_ROWS(r, nr, I8) break;                                         \
      case BF16: BY_ROWS(r, nr, BF16) break;                                     \
      case F32: BY_ROWS(r, nr, F32) break;                                       \
      default: BY_ROWS(r, nr, F16)                                               \
    }                                                                            \
  }

#if defined(IBLLM_BF16DP)
/* bfloat16 weights and bfloat16 rows of x (a model served in bfloat16), on CPUs with AVX512-BF16: vdpbf16ps
   multiplies 32 pairs of values a step (each product exact in float32) and adds them into 16 float32 sums, a
   quarter of the instructions of widening and multiply-adding (on a 2-core EPYC, 7B's 11008 x 4096 matrices:
   27-29 -> 32-36 GB/s). As in block, each output's sums are in one order whatever the number of rows. */
static inline __attribute__((always_inline)) void block_dp(const uint16_t* w, const uint16_t* x, int64_t k_all,
                                                           const float* bias, void* y, int y_kind, int64_t ldy,
                                                           int64_t n, const int nr, const int mr) {
  __m512 acc[NR][2];
  for (int i = 0; i < nr; i++)
    for (int j = 0; j < mr; j++) acc[i][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= k_all; k += 32) {
    __m512bh xv[2];
    for (int j = 0; j < mr; j++) xv[j] = (__m512bh)_mm512_loadu_si512(x + j * k_all + k);
    for (int i = 0; i < nr; i++) {
      const uint16_t* row = w + (n + i) * k_all + k;
      _mm_prefetch((const char*)row + PREFETCH_AHEAD, _MM_HINT_T0);
      __m512bh wv = (__m512bh)_mm512_loadu_si512(row);
      for (int j = 0; j < mr; j++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], wv, xv[j]);
    }
  }
  for (int i = 0; i < nr; i++)
    for (int j = 0; j < mr; j++) {
      float s = _mm512_reduce_add_ps(acc[i][j]);
      for (int64_t t = k; t < k_all; t++) s += widen1(w, (n + i) * k_all + t, BF16) * widen1(x, j * k_all + t, BF16);
      if (bias) s += bias[n + i];
      store(y, j * ldy + n + i, s, y_kind);
    }
}

#define DP(r, nr)                                                                                     \
  for (int64_t m0 = 0; m0 < m; m0 += 2) {                                                           \
    const uint16_t* xr = (const uint16_t*)x + m0 * k_all;                                          \
    void* yr = (char*)y + m0 * ldy * ysize;                                                         \
    if (m - m0 == 1) block_dp((const uint16_t*)w, xr, k_all, bias, yr, y_kind, ldy, r, nr, 1);     \
    else block_dp((const uint16_t*)w, xr, k_all, bias, yr, y_kind, ldy, r, nr, 2);                 \
  }
#endif

/* y (m, n) = x (m, k_all) w^T, times scale[r] where scale is not NULL, plus bias[r] where bias is not NULL, for w
   (n, k_all) of ``kind``, x of ``x_kind`` and y of ``y_kind`` (F32, F16 or BF16), scale and bias float32, all
   row-major and contiguous. x is widened to float32 once, here. Blocks of NR weight rows are shared out between the
   OpenMP threads of the calling thread's team: torch's own (the library is linked against the libgomp torch already
   loaded), so the threads that run torch's ops run this too, without a second pool competing for the cores. Small
   products stay on one thread, where waking the team would cost more than it saves. Returns 0, or -1 when out of
   memory for the widened x. */
int gemv(const void* w, const float* scale, int kind, const void* x, int x_kind, const float* bias, void* y,
         int y_kind, int64_t m, int64_t k_all, int64_t n) {
  const int64_t ldy = n, blocks = (n + NR - 1) / NR, ysize = y_kind == F32 ? 4 : 2;
#if defined(IBLLM_BF16DP)
  const int dot = kind == BF16 && x_kind == BF16 && !scale; /* x stays bfloat16: block_dp */
#else
  const int dot = 0;
#define DP(r, nr)
#endif
  float* owned = NULL;
  const float* xf = (const float*)x;
  if (x_kind != F32 && !dot) {
    owned = (float*)malloc((size_t)(m * k_all) * sizeof(float));
    if (!owned) return -1;
    for (int64_t i = 0; i < m * k_all; i++) owned[i] = widen1(x, i, x_kind);
    xf = owned;
  }
/* Weight rows r..r+nr through the dot products or the widening loop. */
#define ROWS(r, nr) if (dot) { DP(r, nr) } else { AT(r, nr) }
#pragma omp parallel for schedule(static) if (n * k_all >= PARALLEL_MIN)
  for (int64_t b = 0; b < blocks; b++) {
    int64_t r = b * NR;
    if (r + NR <= n) {
      ROWS(r, NR)
    } else {
      for (; r < n; r++) ROWS(r, 1)
    }
  }
  free(owned);
  return 0;
}
