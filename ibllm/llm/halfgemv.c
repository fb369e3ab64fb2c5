/* Products of float16/bfloat16 weights with one or two float32 rows, for ibllm's CPU decode step
   (ibllm/llm/halfgemv.py says why). Built from this one file for the CPU at hand: -DIBLLM_AVX512 (16 floats a vector)
   or -DIBLLM_AVX2 (8). Each weight row is widened to float32 in registers and never written back: the product reads
   the weight's 2 bytes per value once, which is all a one-row product needs to cost. */
#include <immintrin.h>
#include <stdint.h>
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
#else
#error "build with -DIBLLM_AVX512 or -DIBLLM_AVX2"
#endif
#define NR 4 /* rows of the weight per pass */
/* Rows of x per pass. More would fit in registers, but measured here (2-core Xeon, 7B-sized matrices) 4 rows at once
   ran at half the rate of 2: the multiply-adds, not the memory, become the limit. The Python side sends 1 or 2. */
#define MR 2

static inline float scalar(uint16_t h, int bf16) {
  if (bf16) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
  return _cvtsh_ss(h);
}

/* y[j, n + i] = sum_k x[j, k] w[n + i, k] for i < nr, j < mr (both constants where this is inlined). */
static inline __attribute__((always_inline)) void block(const uint16_t* w, int64_t k_all, const float* x, int64_t ldx, float* y,
                                                        int64_t ldy, int64_t n, const int nr, const int mr,
                                                        const int bf16) {
  vec acc[NR][MR];
  for (int i = 0; i < nr; i++)
    for (int j = 0; j < mr; j++) acc[i][j] = ZERO();
  int64_t k = 0;
  for (; k + W <= k_all; k += W) {
    vec xv[MR];
    for (int j = 0; j < mr; j++) xv[j] = LOADX(x + j * ldx + k);
    for (int i = 0; i < nr; i++) {
      const uint16_t* p = w + (n + i) * k_all + k;
      vec wv = bf16 ? FROM_BF16(p) : FROM_F16(p);
      for (int j = 0; j < mr; j++) acc[i][j] = FMA(wv, xv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < nr; i++)
    for (int j = 0; j < mr; j++) {
      float s = HSUM(acc[i][j]);
      for (int64_t t = k; t < k_all; t++) s += scalar(w[(n + i) * k_all + t], bf16) * x[j * ldx + t];
      y[j * ldy + n + i] = s;
    }
}

#define B(nr, mr, bf16) block(w, k_all, x + m0 * ldx, ldx, y + m0 * ldy, ldy, n, nr, mr, bf16)
#define BY_ROWS(nr, bf16) switch (mr) { case 1: B(nr, 1, bf16); break; default: B(nr, 2, bf16); }
/* All rows of x against weight rows n..n+nr: the block of w is read from memory once, then from cache. */
#define AT(nr)                                                           \
  for (int64_t m0 = 0; m0 < m; m0 += MR) {                               \
    int mr = m - m0 < MR ? (int)(m - m0) : MR;                           \
    if (bf16) { BY_ROWS(nr, 1) } else { BY_ROWS(nr, 0) }                 \
  }

/* Columns n0..n1 of y (m, ldy) = x (m, ldx) w^T over k_all inputs, for w (n, k_all) float16 or bfloat16 (bf16 = 1),
   x and y float32, all row-major. Callers split [0, n) between threads. */
void half_gemv(const uint16_t* w, const float* x, int64_t ldx, float* y, int64_t m, int64_t k_all, int64_t ldy, int64_t n0,
               int64_t n1, int bf16) {
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) AT(NR)
  for (; n < n1; n++) AT(1)
}
