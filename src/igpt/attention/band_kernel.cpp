// Band attention on a CPU: each query i attends to the keys i - window < j <= i.
//
// igpt/attention/band_kernel.py compiles this file on first use and calls it through ctypes; where
// it cannot, band attention takes another backend. Why hand-written (docs/design.md):
// PyTorch's CPU flash kernel takes a block of queries against every key any of them sees, so a
// band over whole rows computes (rows + 1) x side keys per query for the rows x side the window
// holds, with a mask; here a tile of 16 queries reads only its window + 15 keys, and no window
// copies are made. The vector arithmetic is simd.h's; -ffast-math lets the exp loops use glibc's vector expf.
// Layouts: every tensor is (B, heads, t, head_dim) given by element strides, head_dim contiguous;
// the log-sum-exp is (B, heads, t), contiguous, and float. q, k, v, the output and the gradients are
// all float or all bfloat16. Forward and backward are the flash-attention recurrences on one tile at a
// time (exact softmax over the tile's keys, no running rescale). In float, and in bf16 on a CPU without
// AVX512-BF16, every product and sum runs in float, so bf16 costs only the conversions on load and store
// (rounded to nearest even). In bf16 on a CPU with it, the bf16-dot path (below) runs the five products
// in vdpbf16ps, twice the multiply-adds per instruction, on bf16 inputs and on the probabilities and the
// scores' gradients rounded to bf16; the scores, softmax, log-sum-exp and every sum stay in float.
#include "simd.h"
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#define TILE 16  // queries per tile

// Queries held in registers at once: a tile row of products per query (REGS / 2), or a head_dim
// accumulator per query (HD / VL registers each), rounded down to a power of two so groups tile TILE.
#define ROWS (REGS / 2 < TILE ? REGS / 2 : TILE)
static constexpr int power_of_two_below(int n) { return n < 2 ? 1 : 2 * power_of_two_below(n / 2); }
template <int HD> struct Group { static const int n = power_of_two_below((REGS / 2) / (HD / VL)); };

static inline int64_t first_key(int64_t query, int64_t window) { return query - window + 1 > 0 ? query - window + 1 : 0; }
static inline int64_t whole_vectors(int64_t n) { return (n + VL - 1) & ~(int64_t)(VL - 1); }  // n rounded up to vectors
static inline int tile_width(int64_t window) { return (int)((window + 2 * TILE - 2) & ~(int64_t)(TILE - 1)); }  // keys a tile can see, rounded up

// x (t rows of HD at stride sx) -> xt (HD rows of tp) in float, zero beyond t so a last partial key tile reads zeros.
template <typename T, int HD>
static void transpose(const T* x, int64_t sx, int64_t t, int64_t tp, float* xt) {
  for (int d = 0; d < HD; d++) {
    float* r = xt + d * tp;
    for (int64_t j = 0; j < t; j++) r[j] = widen(x[j * sx + d]);
    for (int64_t j = t; j < tp; j++) r[j] = 0;
  }
}

// out[i][j] = sum_d a[i][d] * bt[d][lo + j] for the tile's TILE queries and its nk keys.
template <int HD>
static inline void products(const float (*a)[HD], const float* bt, int64_t tp, int64_t lo, int nk, float* out, int width) {
  for (int j = 0; j < nk; j += VL)
    for (int i0 = 0; i0 < TILE; i0 += ROWS) {
      vec acc[ROWS] = {};
      for (int d = 0; d < HD; d++) {
        vec b = load(bt + d * tp + lo + j);
        for (int i = 0; i < ROWS; i++) acc[i] += splat(a[i0 + i][d]) * b;
      }
      for (int i = 0; i < ROWS; i++) store(out + (i0 + i) * width + j, acc[i]);
    }
}

// outt[d][lo + j] += sum_i a[i][d] * w[i][j]: the keys' side of a product, kept transposed.
template <int HD>
static inline void accumulate_transposed(const float (*a)[HD], const float* w, int width, int64_t lo, int nk, float* outt, int64_t tp) {
  for (int j = 0; j < nk; j += VL)
    for (int i0 = 0; i0 < TILE; i0 += ROWS) {
      vec g[ROWS];
      for (int i = 0; i < ROWS; i++) g[i] = load(w + (i0 + i) * width + j);
      for (int d = 0; d < HD; d++) {
        vec acc = load(outt + d * tp + lo + j);
        for (int i = 0; i < ROWS; i++) acc += splat(a[i0 + i][d]) * g[i];
        store(outt + d * tp + lo + j, acc);
      }
    }
}

// out[q0 + i] = factor * sum_j w[i][j] * rows[lo + j] for the tile's queries, each over its own window only.
template <typename T, int HD>
static inline void weighted_rows(const float* w, int width, const T* rows, int64_t sr, int64_t q0, int nq, int64_t lo,
                                 int64_t window, float factor, T* out, int64_t so) {
  const int G = Group<HD>::n;
  for (int i0 = 0; i0 < nq; i0 += G) {
    int n = nq - i0 < G ? nq - i0 : G;
    int ja = (int)(first_key(q0 + i0, window) - lo), jb = (int)(q0 + i0 + n - 1 - lo);
    vec acc[G][HD / VL] = {};
    for (int j = ja; j <= jb; j++) {
      vec r[HD / VL];
      for (int c = 0; c < HD / VL; c++) r[c] = load(rows + (lo + j) * sr + VL * c);
      for (int i = 0; i < G; i++) {
        vec s = splat(w[(i0 + i) * width + j]);
        for (int c = 0; c < HD / VL; c++) acc[i][c] += s * r[c];
      }
    }
    for (int i = 0; i < n; i++)
      for (int c = 0; c < HD / VL; c++) store(out + (q0 + i0 + i) * so + VL * c, acc[i][c] * splat(factor));
  }
}

// A row of scores to exp(score - the window's largest) over its window s[a..b] and 0 elsewhere up to n; returns
// that largest, and the exps' sum in *sum.
static inline float window_exps(float* s, int a, int b, int n, float* sum) {
  float m = s[a];
  for (int j = a + 1; j <= b; j++) m = s[j] > m ? s[j] : m;
  float total = 0.f;
  for (int j = 0; j < n; j++) {
    float e = j >= a && j <= b ? exp_nonpositive(s[j] - m) : 0.f;
    s[j] = e;
    total += e;
  }
  *sum = total;
  return m;
}

// Row i of the backward's tile at q0 (nq queries, keys from lo), up to its n-th key: p's row becomes the
// forward's probabilities, recomputed from the log-sum-exp over the query's window (0 elsewhere), and dp's
// (dP) the scaled scores' gradients P (dP - D).
static inline void score_gradients(float* p, float* dp, int width, int i, int64_t q0, int nq, int64_t lo,
                                   int64_t window, const float* lse, float D, int n) {
  const int a = (int)(first_key(q0 + i, window) - lo), b = i < nq ? (int)(q0 + i - lo) : -1;
  const float l = i < nq ? lse[q0 + i] : 0.f;
  float *s = p + i * width, *ds = dp + i * width;
  for (int j = 0; j < n; j++) {
    float e = j >= a && j <= b ? exp_nonpositive(s[j] - l) : 0.f;
    s[j] = e;
    ds[j] = e * (ds[j] - D);
  }
}

// One tile's queries (scaled) and, in the backward, their output gradients; rows past t are zero.
template <typename T, int HD>
static inline void load_tile(const T* x, int64_t sx, int64_t q0, int nq, float factor, float (*tile)[HD]) {
  for (int i = 0; i < TILE; i++)
    for (int d = 0; d < HD; d++) tile[i][d] = i < nq ? widen(x[(q0 + i) * sx + d]) * factor : 0.f;
}

template <typename T>
struct Head { const T *q, *k, *v, *o, *dO; const float* lse; T* out; float* lse_out; T *dq, *dk, *dv;
              int64_t sq, sk, sv, so, sdo, sdq, sdk, sdv; };

// Keys a transposed row holds: t and two tiles of zeros, so a last partial key tile reads zeros.
static inline int64_t transposed_length(int64_t t) { return t + 2 * TILE; }

// work: k transposed, then a tile of scores.
template <typename T, int HD>
static void forward_head(const Head<T>& h, int64_t t, int64_t window, float scale, float* work) {
  const int64_t tp = transposed_length(t);
  const int width = tile_width(window);
  float *kt = work, *p = kt + HD * tp;
  transpose<T, HD>(h.k, h.sk, t, tp, kt);
  float qs[TILE][HD];
  for (int64_t q0 = 0; q0 < t; q0 += TILE) {
    int nq = t - q0 < TILE ? (int)(t - q0) : TILE;
    int64_t lo = first_key(q0, window);
    int nk = (int)(q0 + nq - lo);
    load_tile<T, HD>(h.q, h.sq, q0, nq, scale, qs);
    products<HD>(qs, kt, tp, lo, nk, p, width);
    for (int i = 0; i < nq; i++) {
      float* s = p + i * width;
      float sum, m = window_exps(s, (int)(first_key(q0 + i, window) - lo), (int)(q0 + i - lo), nk, &sum);
      for (int j = 0; j < nk; j++) s[j] /= sum;
      h.lse_out[q0 + i] = m + logf(sum);
    }
    weighted_rows<T, HD>(p, width, h.v, h.sv, q0, nq, lo, window, 1.f, h.out, h.so);
  }
}

// work: k, v, dk and dv transposed, then two tiles of scores (P and dP).
template <typename T, int HD>
static void backward_head(const Head<T>& h, int64_t t, int64_t window, float scale, float* work) {
  const int64_t tp = transposed_length(t);
  const int width = tile_width(window);
  float *kt = work, *vt = kt + HD * tp, *dkt = vt + HD * tp, *dvt = dkt + HD * tp, *p = dvt + HD * tp,
        *dp = p + TILE * width;
  transpose<T, HD>(h.k, h.sk, t, tp, kt);
  transpose<T, HD>(h.v, h.sv, t, tp, vt);
  memset(dkt, 0, sizeof(float) * 2 * HD * tp);
  float qs[TILE][HD], gs[TILE][HD], D[TILE];
  for (int64_t q0 = 0; q0 < t; q0 += TILE) {
    int nq = t - q0 < TILE ? (int)(t - q0) : TILE;
    int64_t lo = first_key(q0, window);
    int nk = (int)(q0 + nq - lo);
    load_tile<T, HD>(h.q, h.sq, q0, nq, scale, qs);
    load_tile<T, HD>(h.dO, h.sdo, q0, nq, 1.f, gs);
    for (int i = 0; i < TILE; i++) {
      float s = 0.f;
      for (int d = 0; d < HD; d++) s += i < nq ? gs[i][d] * widen(h.o[(q0 + i) * h.so + d]) : 0.f;
      D[i] = s;  // dO . O: the softmax's backward needs it per query
    }
    products<HD>(qs, kt, tp, lo, nk, p, width);
    products<HD>(gs, vt, tp, lo, nk, dp, width);
    const int padded = (int)whole_vectors(nk);
    for (int i = 0; i < TILE; i++) score_gradients(p, dp, width, i, q0, nq, lo, window, h.lse, D[i], padded);
    accumulate_transposed<HD>(qs, dp, width, lo, nk, dkt, tp);
    accumulate_transposed<HD>(gs, p, width, lo, nk, dvt, tp);
    weighted_rows<T, HD>(dp, width, h.k, h.sk, q0, nq, lo, window, scale, h.dq, h.sdq);
  }
  for (int64_t j = 0; j < t; j++)
    for (int d = 0; d < HD; d++) {
      put(h.dk + j * h.sdk + d, dkt[d * tp + j]);
      put(h.dv + j * h.sdv + d, dvt[d * tp + j]);
    }
}

// One thread's working memory and the heads that work in it: forward_head and backward_head, in float, for
// float and for bf16, except bf16 where AVX512-BF16 takes the bf16-dot path (Path<bf16, HD> below).
template <typename T, int HD>
struct Path {
  static size_t bytes(bool backward, int64_t t, int64_t window) {
    const int64_t buffers = backward ? 4 : 1;  // k transposed; in the backward also v, dk and dv transposed
    return sizeof(float) * (buffers * HD * transposed_length(t) + 2 * TILE * tile_width(window));
  }
  static void forward(const Head<T>& h, int64_t t, int64_t window, float scale, void* work) {
    forward_head<T, HD>(h, t, window, scale, (float*)work);
  }
  static void backward(const Head<T>& h, int64_t t, int64_t window, float scale, void* work) {
    backward_head<T, HD>(h, t, window, scale, (float*)work);
  }
};

#if defined(__AVX512BF16__)
// The bf16-dot path, bf16 on a CPU with AVX512-BF16: vdpbf16ps multiplies two adjacent bf16s of one operand
// by the two of the other and adds both products to a float lane, 32 multiply-adds per instruction against a
// float FMA's 16. So each product's operands are laid out in pairs along the dimension it sums over, two
// bf16s to a 32-bit word: k and v as [d/2][key][2] for the scores and dP = dO V^T (sums over d), v and k as
// [key/2][d][2] for O = P V and dQ = dS K (over keys), a tile's P, dS, q and dO as [query/2][.][2] for
// dV += P^T dO and dK += dS^T Q (over the tile's queries). P and dS are rounded to bf16 for their products,
// as GPU flash attention (and PyTorch's CPU flash kernel) does in bf16; the sums stay in float. q is used as
// it came (the scale multiplies the scores, and dK once at the end), so no input is rounded twice.
// (pair, pvec, load_pairs, pair_at and dot: simd.h)
static inline void store(pair* p, pvec x) { _mm512_storeu_si512(p, x); }
// p, as far as the compiler knows changed: read inside a loop, its pairs are not hoisted out of it (GCC would
// broadcast every pair of a tile ahead of the loop over keys and spill them, 64 bytes read per 4 of them).
template <typename P>
static inline P* fresh(P* p) { asm("" : "+r"(p)); return p; }
// x rounded to bf16, to nearest even as store() rounds.
static inline void store_rounded(bf16* p, vec x) { __m256bh h = _mm512_cvtneps_pbh((__m512)x); memcpy(p, &h, sizeof h); }
// Two rows' floats rounded to bf16 and paired: lane l holds (first[l], second[l]).
static inline pvec pair_rows(vec first, vec second) {
  static const uint16_t interleave[2 * VL] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                              8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  __m512i both = (__m512i)_mm512_cvtne2ps_pbh((__m512)second, (__m512)first);  // first's in the low half
  return _mm512_permutexvar_epi16(_mm512_loadu_si512(interleave), both);
}

// r[row][column] (VL x VL words) transposed: pairs of 32-bit lanes, then of 64-bit lanes, then of 128-bit quarters.
static inline void transpose(pvec r[VL]) {
  pvec u[VL];
  for (int k = 0; k < VL; k += 2) {
    u[k] = _mm512_unpacklo_epi32(r[k], r[k + 1]);
    u[k + 1] = _mm512_unpackhi_epi32(r[k], r[k + 1]);
  }
  for (int k = 0; k < VL; k += 4) {  // r[k + m]'s quarter q: column 4 q + m of rows k to k + 3
    r[k] = _mm512_unpacklo_epi64(u[k], u[k + 2]);
    r[k + 1] = _mm512_unpackhi_epi64(u[k], u[k + 2]);
    r[k + 2] = _mm512_unpacklo_epi64(u[k + 1], u[k + 3]);
    r[k + 3] = _mm512_unpackhi_epi64(u[k + 1], u[k + 3]);
  }
  for (int m = 0; m < 4; m++) {  // quarters 0 and 2 (v), 1 and 3 (w) of rows 0-7, then of rows 8-15
    pvec v = _mm512_shuffle_i32x4(r[m], r[4 + m], 0x88), w = _mm512_shuffle_i32x4(r[m], r[4 + m], 0xDD);
    pvec v2 = _mm512_shuffle_i32x4(r[8 + m], r[12 + m], 0x88), w2 = _mm512_shuffle_i32x4(r[8 + m], r[12 + m], 0xDD);
    u[m] = _mm512_shuffle_i32x4(v, v2, 0x88);
    u[4 + m] = _mm512_shuffle_i32x4(w, w2, 0x88);
    u[8 + m] = _mm512_shuffle_i32x4(v, v2, 0xDD);
    u[12 + m] = _mm512_shuffle_i32x4(w, w2, 0xDD);
  }
  for (int k = 0; k < VL; k++) r[k] = u[k];
}

// x (t rows of HD at stride sx) -> xp, pairs along d: HD / 2 rows of tp (a multiple of VL), zero beyond t.
template <int HD>
static void pairs_along_d(const bf16* x, int64_t sx, int64_t t, int64_t tp, pair* xp) {
  for (int64_t j = 0; j < tp; j += VL)
    for (int c = 0; c < HD / 2; c += VL) {
      const int n = HD / 2 - c < VL ? HD / 2 - c : VL;  // 8 in the last block where HD / 2 is 8 or 24
      pvec r[VL];
      for (int k = 0; k < VL; k++)
        r[k] = j + k < t ? _mm512_maskz_loadu_epi32((__mmask16)((1u << n) - 1), x + (j + k) * sx + 2 * c)
                         : _mm512_setzero_si512();
      transpose(r);
      for (int k = 0; k < n; k++) store(xp + (c + k) * tp + j, r[k]);
    }
}

// x (n rows of HD at stride sx) -> xp, pairs of rows: np / 2 rows of HD (np even), zero beyond n.
template <int HD>
static void pairs_along_rows(const bf16* x, int64_t sx, int64_t n, int64_t np, pair* xp) {
  for (int64_t j = 0; j < np; j += 2)
    for (int d = 0; d < HD; d++)
      xp[j / 2 * HD + d] = (j < n ? x[j * sx + d] : 0) | (pair)(j + 1 < n ? x[(j + 1) * sx + d] : 0) << 16;
}

// One tile's queries (or output gradients) as pairs along d, as they came; rows past t are zero.
template <int HD>
static inline void load_tile(const bf16* x, int64_t sx, int64_t q0, int nq, pair (*tile)[HD / 2]) {
  for (int i = 0; i < TILE; i++)
    for (int c = 0; c < HD / 2; c++) tile[i][c] = i < nq ? pair_at(x + (q0 + i) * sx + 2 * c) : 0;
}

// The rows of the tile at q0, brought into cache while the tile before it computes: in the model's layout rows
// lie far apart, the hardware's prefetchers do not fetch them ahead, and each tile began by waiting for memory.
template <int HD>
static inline void prefetch_tile(const bf16* x, int64_t sx, int64_t q0, int64_t t) {
  for (int64_t i = q0; i < q0 + TILE && i < t; i++)
    for (int d = 0; d < HD + 32; d += 32) __builtin_prefetch(x + i * sx + (d < HD ? d : HD - 1));
}

// out[i][j] = factor * sum_d a[i][d] * b[d][lo + j], a's rows and b as pairs along d.
template <int HD>
static inline void products(const pair (*a)[HD / 2], const pair* b, int64_t tp, int64_t lo, int nk, float factor,
                            float* out, int width) {
  for (int j = 0; j < nk; j += VL)
    for (int i0 = 0; i0 < TILE; i0 += ROWS) {
      const pair(*at)[HD / 2] = fresh(a);
      vec acc[ROWS] = {};
      for (int c = 0; c < HD / 2; c++) {
        pvec bc = load_pairs(b + c * tp + lo + j);
        for (int i = 0; i < ROWS; i++) acc[i] = dot(acc[i], bc, at[i0 + i][c]);
      }
      for (int i = 0; i < ROWS; i++) store(out + (i0 + i) * width + j, acc[i] * splat(factor));
    }
}

// outt[d][lo + j] += sum_i a[i][d] * w[i][j], a and w as pairs along the tile's queries (TILE / 2 rows each).
template <int HD>
static inline void accumulate_transposed(const pair (*a)[HD], const pair* w, int width, int64_t lo, int nk,
                                         float* outt, int64_t tp) {
  for (int j = 0; j < nk; j += VL) {
    pvec g[TILE / 2];
    for (int i = 0; i < TILE / 2; i++) g[i] = load_pairs(w + i * width + j);
    const pair(*at)[HD] = fresh(a);
    for (int d = 0; d < HD; d++) {
      vec acc = load(outt + d * tp + lo + j);
      for (int i = 0; i < TILE / 2; i++) acc = dot(acc, g[i], at[i][d]);
      store(outt + d * tp + lo + j, acc);
    }
  }
}

// out[q0 + i] = factor[i] * sum_j w[i][j] * rows[lo + j] for the tile's queries, each group over its own windows'
// key pairs: w's rows in bf16 (adjacent keys are the pairs, lo even), rows as pairs along the keys.
template <int HD>
static inline void weighted_rows(const bf16* w, int width, const pair* rows, int64_t q0, int nq, int64_t lo,
                                 int64_t window, const float* factor, bf16* out, int64_t so) {
  const int G = Group<HD>::n;
  for (int i0 = 0; i0 < nq; i0 += G) {
    int n = nq - i0 < G ? nq - i0 : G;
    int ja = (int)(first_key(q0 + i0, window) - lo) / 2, jb = (int)(q0 + i0 + n - 1 - lo) / 2;
    vec acc[G][HD / VL] = {};
    for (int j = ja; j <= jb; j++) {
      pvec r[HD / VL];
      for (int c = 0; c < HD / VL; c++) r[c] = load_pairs(rows + (lo / 2 + j) * HD + VL * c);
      for (int i = 0; i < G; i++) {
        pair s = pair_at(w + (i0 + i) * width + 2 * j);
        for (int c = 0; c < HD / VL; c++) acc[i][c] = dot(acc[i][c], r[c], s);
      }
    }
    for (int i = 0; i < n; i++)
      for (int c = 0; c < HD / VL; c++) store(out + (q0 + i0 + i) * so + VL * c, acc[i][c] * splat(factor[i0 + i]));
  }
}

// The tiles as in forward_head and backward_head, each product on pairs. A tile's keys start on an even key
// (lo rounded down; the key before is masked out like any outside a window) so that its rows of P and dS pair
// up with the keys' pairs. That key comes only with an even window, whose tile_width (window + 15 keys, odd,
// rounded up) has room for it. P and dS are zero beyond each row's window up to the key tiles' VL:
// weighted_rows reads up to the pair of a group's last key.
template <int HD>
struct Path<bf16, HD> {
  static int64_t span(int64_t t) { return whole_vectors(transposed_length(t)); }  // keys in the layouts
  // k along d and v as pairs of keys, a tile's P in float and in bf16; in the backward k and v along d, k as
  // pairs of keys, P and dS as pairs of queries, dk and dv transposed in float, a tile's P and dP in float
  // and dS in bf16.
  static size_t bytes(bool backward, int64_t t, int64_t window) {
    const int64_t tp = span(t), tile = TILE * tile_width(window);
    if (!backward) return sizeof(pair) * HD * tp + sizeof(float) * tile + sizeof(bf16) * tile;
    return sizeof(pair) * (3 * HD / 2 * tp + tile) + sizeof(float) * (2 * HD * tp + 2 * tile) + sizeof(bf16) * tile;
  }

  static void forward(const Head<bf16>& h, int64_t t, int64_t window, float scale, void* work) {
    const int64_t tp = span(t);
    const int width = tile_width(window);
    pair *kd = (pair*)work, *vk = kd + HD / 2 * tp;
    float* p = (float*)(vk + HD / 2 * tp);
    bf16* pb = (bf16*)(p + TILE * width);
    pairs_along_d<HD>(h.k, h.sk, t, tp, kd);
    pairs_along_rows<HD>(h.v, h.sv, t, tp, vk);
    pair qs[TILE][HD / 2];
    float normal[TILE];
    for (int64_t q0 = 0; q0 < t; q0 += TILE) {
      int nq = t - q0 < TILE ? (int)(t - q0) : TILE;
      int64_t lo = first_key(q0, window) & ~(int64_t)1;
      int nk = (int)(q0 + nq - lo);
      const int padded = (int)whole_vectors(nk);
      load_tile<HD>(h.q, h.sq, q0, nq, qs);
      prefetch_tile<HD>(h.q, h.sq, q0 + TILE, t);
      products<HD>(qs, kd, tp, lo, nk, scale, p, width);
      for (int i = 0; i < nq; i++) {
        float* s = p + i * width;
        float sum, m = window_exps(s, (int)(first_key(q0 + i, window) - lo), (int)(q0 + i - lo), padded, &sum);
        // P unnormalised (its largest exactly 1) in bf16, and O = P V divided by the sum of those bf16 weights
        // so that they sum to one (the float sum would scale each output by their rounding as well).
        for (int j = 0; j < padded; j += VL) store_rounded(pb + i * width + j, load(s + j));
        float rounded = 0.f;
        for (int j = 0; j < padded; j++) rounded += widen(pb[i * width + j]);
        normal[i] = 1.f / rounded;
        h.lse_out[q0 + i] = m + logf(sum);
      }
      weighted_rows<HD>(pb, width, vk, q0, nq, lo, window, normal, h.out, h.so);
    }
  }

  static void backward(const Head<bf16>& h, int64_t t, int64_t window, float scale, void* work) {
    const int64_t tp = span(t);
    const int width = tile_width(window);
    pair *kd = (pair*)work, *vd = kd + HD / 2 * tp, *kk = vd + HD / 2 * tp, *pq = kk + HD / 2 * tp,
         *dsq = pq + TILE / 2 * width;
    float *dkt = (float*)(dsq + TILE / 2 * width), *dvt = dkt + HD * tp, *p = dvt + HD * tp, *dp = p + TILE * width;
    bf16* dsb = (bf16*)(dp + TILE * width);
    pairs_along_d<HD>(h.k, h.sk, t, tp, kd);
    pairs_along_d<HD>(h.v, h.sv, t, tp, vd);
    pairs_along_rows<HD>(h.k, h.sk, t, tp, kk);
    memset(dkt, 0, sizeof(float) * 2 * HD * tp);
    pair qs[TILE][HD / 2], gs[TILE][HD / 2], qq[TILE / 2][HD], gq[TILE / 2][HD];  // q, dO along d; along queries
    float D[TILE], scales[TILE];
    for (int i = 0; i < TILE; i++) scales[i] = scale;
    for (int64_t q0 = 0; q0 < t; q0 += TILE) {
      int nq = t - q0 < TILE ? (int)(t - q0) : TILE;
      int64_t lo = first_key(q0, window) & ~(int64_t)1;
      int nk = (int)(q0 + nq - lo);
      load_tile<HD>(h.q, h.sq, q0, nq, qs);
      load_tile<HD>(h.dO, h.sdo, q0, nq, gs);
      pairs_along_rows<HD>(h.q + q0 * h.sq, h.sq, nq, TILE, qq[0]);
      pairs_along_rows<HD>(h.dO + q0 * h.sdo, h.sdo, nq, TILE, gq[0]);
      prefetch_tile<HD>(h.q, h.sq, q0 + TILE, t);
      prefetch_tile<HD>(h.dO, h.sdo, q0 + TILE, t);
      prefetch_tile<HD>(h.o, h.so, q0 + TILE, t);
      for (int i = 0; i < TILE; i++) {
        vec s = {};
        for (int d = 0; i < nq && d < HD; d += VL)
          s += load(h.dO + (q0 + i) * h.sdo + d) * load(h.o + (q0 + i) * h.so + d);
        D[i] = _mm512_reduce_add_ps((__m512)s);  // dO . O: the softmax's backward needs it per query
      }
      products<HD>(qs, kd, tp, lo, nk, scale, p, width);
      products<HD>(gs, vd, tp, lo, nk, 1.f, dp, width);
      const int padded = (int)whole_vectors(nk);
      for (int i = 0; i < TILE; i++) {
        score_gradients(p, dp, width, i, q0, nq, lo, window, h.lse, D[i], padded);
        for (int j = 0; j < padded; j += VL) store_rounded(dsb + i * width + j, load(dp + i * width + j));
      }
      for (int i = 0; i < TILE; i += 2)
        for (int j = 0; j < padded; j += VL) {
          store(pq + i / 2 * width + j, pair_rows(load(p + i * width + j), load(p + (i + 1) * width + j)));
          store(dsq + i / 2 * width + j, pair_rows(load(dp + i * width + j), load(dp + (i + 1) * width + j)));
        }
      accumulate_transposed<HD>(qq, dsq, width, lo, nk, dkt, tp);
      accumulate_transposed<HD>(gq, pq, width, lo, nk, dvt, tp);
      weighted_rows<HD>(dsb, width, kk, q0, nq, lo, window, scales, h.dq, h.sdq);
    }
    for (int64_t j = 0; j < t; j++)
      for (int d = 0; d < HD; d++) {
        put(h.dk + j * h.sdk + d, dkt[d * tp + j] * scale);  // the scale q was not given
        put(h.dv + j * h.sdv + d, dvt[d * tp + j]);
      }
  }
};
#endif

// Every (batch, head) pair on its own, shared out over torch's OpenMP threads (the same libgomp
// torch loaded, so the two never compete for the cores).
template <typename T, int HD>
static int run(bool backward, Head<T> h, const int64_t* s, int64_t pairs, int64_t heads, int64_t t, int64_t window,
               float scale, int threads) {
  int out_of_memory = 0;
#pragma omp parallel num_threads(threads)
  {
    FlushDenormals flush;
    void* work = malloc(Path<T, HD>::bytes(backward, t, window));
    if (!work) {
#pragma omp atomic write
      out_of_memory = 1;
    }
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < pairs; bh++) {
      if (!work) continue;
      int64_t b = bh / heads, n = bh % heads;
      Head<T> g = h;
      // strides: (batch, head, position) for q, k, v, o, then dO, dq, dk, dv in the backward
      g.q += b * s[0] + n * s[1]; g.k += b * s[3] + n * s[4]; g.v += b * s[6] + n * s[7];
      if (backward) {
        g.o += b * s[9] + n * s[10]; g.dO += b * s[12] + n * s[13]; g.lse += bh * t;
        g.dq += b * s[15] + n * s[16]; g.dk += b * s[18] + n * s[19]; g.dv += b * s[21] + n * s[22];
        Path<T, HD>::backward(g, t, window, scale, work);
      } else {
        g.out += b * s[9] + n * s[10]; g.lse_out += bh * t;
        Path<T, HD>::forward(g, t, window, scale, work);
      }
    }
    free(work);
  }
  return out_of_memory ? 2 : 0;
}

template <typename T>
static int dispatch(bool backward, const Head<T>& h, const int64_t* s, int64_t pairs, int64_t heads, int64_t t,
                    int64_t hd, int64_t window, float scale, int threads) {
  switch (hd) {  // 0: done; 1: no case for this head size; 2: out of memory
    case 16: return run<T, 16>(backward, h, s, pairs, heads, t, window, scale, threads);
    case 32: return run<T, 32>(backward, h, s, pairs, heads, t, window, scale, threads);
    case 48: return run<T, 48>(backward, h, s, pairs, heads, t, window, scale, threads);
    case 64: return run<T, 64>(backward, h, s, pairs, heads, t, window, scale, threads);
    case 96: return run<T, 96>(backward, h, s, pairs, heads, t, window, scale, threads);
    case 128: return run<T, 128>(backward, h, s, pairs, heads, t, window, scale, threads);
  }
  return 1;
}

template <typename T>
static int forward_all(const T* q, const T* k, const T* v, T* out, float* lse, const int64_t* strides, int64_t pairs,
                       int64_t heads, int64_t t, int64_t hd, int64_t window, float scale, int threads) {
  Head<T> h = {};
  h.q = q; h.k = k; h.v = v; h.out = out; h.lse_out = lse;
  h.sq = strides[2]; h.sk = strides[5]; h.sv = strides[8]; h.so = strides[11];
  return dispatch<T>(false, h, strides, pairs, heads, t, hd, window, scale, threads);
}

template <typename T>
static int backward_all(const T* q, const T* k, const T* v, const T* out, const float* lse, const T* dO, T* dq, T* dk,
                        T* dv, const int64_t* strides, int64_t pairs, int64_t heads, int64_t t, int64_t hd,
                        int64_t window, float scale, int threads) {
  Head<T> h = {};
  h.q = q; h.k = k; h.v = v; h.o = out; h.lse = lse; h.dO = dO; h.dq = dq; h.dk = dk; h.dv = dv;
  h.sq = strides[2]; h.sk = strides[5]; h.sv = strides[8]; h.so = strides[11]; h.sdo = strides[14];
  h.sdq = strides[17]; h.sdk = strides[20]; h.sdv = strides[23];
  return dispatch<T>(true, h, strides, pairs, heads, t, hd, window, scale, threads);
}

// The exported pair for element type T: band_forward<suffix> and band_backward<suffix>.
// forward: every one of the pairs = B x heads, out and lse (B, heads, t, contiguous, float) from q, k, v;
// backward: every pair's dq, dk, dv from the forward's q, k, v, out and lse and the output's gradient dO.
#define EXPORT(T, SUFFIX)                                                                                              \
  int band_forward##SUFFIX(const T* q, const T* k, const T* v, T* out, float* lse, const int64_t* strides,            \
                           int64_t pairs, int64_t heads, int64_t t, int64_t hd, int64_t window, float scale,          \
                           int threads) {                                                                             \
    return forward_all(q, k, v, out, lse, strides, pairs, heads, t, hd, window, scale, threads);                      \
  }                                                                                                                   \
  int band_backward##SUFFIX(const T* q, const T* k, const T* v, const T* out, const float* lse, const T* dO, T* dq,    \
                            T* dk, T* dv, const int64_t* strides, int64_t pairs, int64_t heads, int64_t t, int64_t hd, \
                            int64_t window, float scale, int threads) {                                               \
    return backward_all(q, k, v, out, lse, dO, dq, dk, dv, strides, pairs, heads, t, hd, window, scale, threads);      \
  }

extern "C" {
EXPORT(float, )
EXPORT(bf16, _bf16)
}
