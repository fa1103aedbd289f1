// Vector arithmetic shared by igpt's C++ kernels (attention/band_kernel.cpp, decode_kernel.cpp).
//
// Plain C++ with GCC/Clang vector extensions: one source builds for AVX-512, AVX2 or NEON under
// -march=native (igpt/kernels.py). Elements are float or bfloat16 (bf16: a float's upper 16 bits);
// these helpers compute in float, so bf16 costs only the conversions on load and store, rounded to
// nearest even with NaN kept a NaN. Where the CPU has AVX512-BF16, the vdpbf16ps helpers below multiply
// bf16 pairs for both kernels' bf16 products.
#pragma once
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__SSE3__)
#include <pmmintrin.h>
#endif

#if defined(__AVX512F__)
#define VL 16
#define REGS 32
#elif defined(__AVX__)
#define VL 8
#define REGS 16
#else
#define VL 4
#define REGS 16
#endif

typedef float vec __attribute__((vector_size(VL * 4)));
static inline vec load(const float* p) { vec r; memcpy(&r, p, sizeof r); return r; }
static inline void store(float* p, vec x) { memcpy(p, &x, sizeof x); }
static inline vec splat(float x) { return x - (vec){}; }
static inline float lane_sum(vec x) { float s = 0; for (int l = 0; l < VL; l++) s += x[l]; return s; }

typedef uint16_t bf16;  // bfloat16's bits: a float's upper half
typedef uint32_t uvec __attribute__((vector_size(VL * 4)));
typedef uint16_t hvec __attribute__((vector_size(VL * 2)));
static inline float widen(float x) { return x; }
static inline float widen(bf16 x) { uint32_t u = (uint32_t)x << 16; float f; memcpy(&f, &u, 4); return f; }
static inline vec load(const bf16* p) {
  hvec h; memcpy(&h, p, sizeof h);
  uvec u = __builtin_convertvector(h, uvec) << 16;
  vec r; memcpy(&r, &u, sizeof r); return r;
}
static inline uint32_t nearest_bf16(uint32_t u) {  // round to nearest even; NaN stays a (quiet) NaN
  return (u & 0x7FFFFFFF) > 0x7F800000 ? 0x7FC0 : (u + 0x7FFF + ((u >> 16) & 1)) >> 16;
}
static inline void store(bf16* p, vec x) {
  uvec u; memcpy(&u, &x, sizeof u);
  uvec nan = (uvec)((u & 0x7FFFFFFF) > 0x7F800000);
  uvec r = (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & ~nan) | (nan & 0x7FC0);
  hvec h = __builtin_convertvector(r, hvec); memcpy(p, &h, sizeof h);
}
static inline void put(float* p, float x) { *p = x; }
static inline void put(bf16* p, float x) { uint32_t u; memcpy(&u, &x, 4); *p = (bf16)nearest_bf16(u); }

#if defined(__AVX512BF16__)
// AVX512-BF16's vdpbf16ps multiplies two adjacent bf16s of one operand by the two of the other and adds both
// products to a float lane: 32 multiply-adds per instruction against a float FMA's 16, for operands laid out
// in pairs along the dimension a product sums over.
#include <immintrin.h>
typedef uint32_t pair;  // two bf16s in one 32-bit word, the first in the low half
typedef __m512i pvec;  // VL of them
static inline pvec load_pairs(const pair* p) { return _mm512_loadu_si512(p); }
static inline pair pair_at(const bf16* p) { pair w; memcpy(&w, p, sizeof w); return w; }
// acc plus, in each lane, b's pair there times a's (the same pair in every lane, broadcast from memory).
static inline vec dot(vec acc, pvec b, pair a) {
  return (vec)_mm512_dpbf16_ps((__m512)acc, (__m512bh)b, (__m512bh)_mm512_set1_epi32((int)a));
}
#endif

// exp of a score minus its row's maximum or log-sum-exp (x <= 0), floored where the result would
// leave float's normal range: glibc's vector expf hands such lanes to a scalar routine, an order of
// magnitude slower, and a trained model's sharp attention puts many scores there (the step slowed
// as the weights trained). The floor adds under 2e-38 to a probability already below that.
static inline float exp_nonpositive(float x) { return expf(x > -87.f ? x : -87.f); }


// Subnormals read and written as zero on the calling thread while this lives, then the caller's mode
// back: a trained model's probabilities fall under float's normal range, where x86 arithmetic takes
// a microcoded path many times slower (torch.set_flush_denormal reaches only the thread that calls
// it, not the kernels' OpenMP threads). No value changes by more than 1.2e-38.
struct FlushDenormals {
#if defined(__SSE3__)
  unsigned csr = _mm_getcsr();
  FlushDenormals() { _mm_setcsr(csr | _MM_FLUSH_ZERO_ON | _MM_DENORMALS_ZERO_ON); }
  ~FlushDenormals() { _mm_setcsr(csr); }
#endif
};
