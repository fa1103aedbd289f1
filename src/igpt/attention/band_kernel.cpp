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
// all float or all bfloat16; either way every product and sum runs in float, so bf16 costs only
// the conversions on load and store (rounded to nearest even). Forward and backward are the flash-attention
// recurrences on one tile at a time (exact softmax over the tile's keys, no running rescale).
#include "simd.h"

#define TILE 16  // queries per tile

// Queries held in registers at once: a tile row of products per query (REGS / 2), or a head_dim
// accumulator per query (HD / VL registers each), rounded down to a power of two so groups tile TILE.
#define ROWS (REGS / 2 < TILE ? REGS / 2 : TILE)
static constexpr int power_of_two_below(int n) { return n < 2 ? 1 : 2 * power_of_two_below(n / 2); }
template <int HD> struct Group { static const int n = power_of_two_below((REGS / 2) / (HD / VL)); };

static inline int64_t first_key(int64_t query, int64_t window) { return query - window + 1 > 0 ? query - window + 1 : 0; }
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

// One tile's queries (scaled) and, in the backward, their output gradients; rows past t are zero.
template <typename T, int HD>
static inline void load_tile(const T* x, int64_t sx, int64_t q0, int nq, float factor, float (*tile)[HD]) {
  for (int i = 0; i < TILE; i++)
    for (int d = 0; d < HD; d++) tile[i][d] = i < nq ? widen(x[(q0 + i) * sx + d]) * factor : 0.f;
}

template <typename T>
struct Head { const T *q, *k, *v, *o, *dO; const float* lse; T* out; float* lse_out; T *dq, *dk, *dv;
              int64_t sq, sk, sv, so, sdo, sdq, sdk, sdv; };

template <typename T, int HD>
static void forward_head(const Head<T>& h, int64_t t, int64_t window, float scale, float* kt, float* p) {
  const int64_t tp = t + 2 * TILE;
  const int width = tile_width(window);
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
      int a = (int)(first_key(q0 + i, window) - lo), b = (int)(q0 + i - lo);
      float m = s[a];
      for (int j = a + 1; j <= b; j++) m = s[j] > m ? s[j] : m;
      float sum = 0.f;
      for (int j = 0; j < nk; j++) {
        float e = j >= a && j <= b ? exp_nonpositive(s[j] - m) : 0.f;
        s[j] = e;
        sum += e;
      }
      for (int j = 0; j < nk; j++) s[j] /= sum;
      h.lse_out[q0 + i] = m + logf(sum);
    }
    weighted_rows<T, HD>(p, width, h.v, h.sv, q0, nq, lo, window, 1.f, h.out, h.so);
  }
}

template <typename T, int HD>
static void backward_head(const Head<T>& h, int64_t t, int64_t window, float scale, float* work, float* p) {
  const int64_t tp = t + 2 * TILE;
  const int width = tile_width(window);
  float *kt = work, *vt = kt + HD * tp, *dkt = vt + HD * tp, *dvt = dkt + HD * tp, *dp = p + TILE * width;
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
    const int padded = (nk + VL - 1) & ~(VL - 1);
    for (int i = 0; i < TILE; i++) {
      int a = (int)(first_key(q0 + i, window) - lo), b = i < nq ? (int)(q0 + i - lo) : -1;
      float l = i < nq ? h.lse[q0 + i] : 0.f;
      float *s = p + i * width, *ds = dp + i * width;
      for (int j = 0; j < padded; j++) {
        float e = j >= a && j <= b ? exp_nonpositive(s[j] - l) : 0.f;  // the forward's probabilities, recomputed
        s[j] = e;
        ds[j] = e * (ds[j] - D[i]);  // the gradient of the scaled scores
      }
    }
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

// Every (batch, head) pair on its own, shared out over torch's OpenMP threads (the same libgomp
// torch loaded, so the two never compete for the cores).
template <typename T, int HD>
static int run(bool backward, Head<T> h, const int64_t* s, int64_t pairs, int64_t heads, int64_t t, int64_t window,
               float scale, int threads) {
  const int64_t tp = t + 2 * TILE;
  int out_of_memory = 0;
#pragma omp parallel num_threads(threads)
  {
    FlushDenormals flush;
    const int64_t buffers = backward ? 4 : 1;  // k transposed; in the backward also v, dk and dv transposed
    float* work = (float*)malloc(sizeof(float) * (buffers * HD * tp + 2 * TILE * tile_width(window)));
    float* p = work ? work + buffers * HD * tp : NULL;
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
        backward_head<T, HD>(g, t, window, scale, work, p);
      } else {
        g.out += b * s[9] + n * s[10]; g.lse_out += bh * t;
        forward_head<T, HD>(g, t, window, scale, work, p);
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
