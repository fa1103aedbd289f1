// Sampling steps of an autoregressive igpt model on a CPU: a new pixel per image through every
// block, from its token to the next pixel's logits and, when asked, the next pixel drawn from them
// and fed back, for a run of steps in one call.
//
// igpt/decoding.py calls this through ctypes: one step for `Decoder.feed`, a run of drawn steps (up
// to the image's end) for `Decoder.feed_and_draw`. Why hand-written (docs/design.md): at a
// sampling batch a step is about 90 small operations, and dispatched one at a time their fixed cost,
// not their arithmetic, sets the pace. Here a run of steps is one OpenMP region whose threads meet
// at a barrier between the phases of each block, each phase's work shared out by the threads' measured
// speed (Balance); each product streams the weights once, with the batch's rows held in registers.
//
// The weights are decoding.DecodeWeights' panels: the blocks' matrices with the RMS-norm gains and
// quick GELU's 1.702 folded in, so a norm is one scale per row, applied to the product's result, and the
// MLP's activation is silu. Weights and the key/value cache are float or bfloat16 together; every
// sum runs in float (bf16's products with AVX512-BF16: PAIRED, below). The cache holds (batch, heads,
// slots, head_dim) per layer, written and read as igpt/attention/patterns.py's Pattern.read does:
// dense and column layers keep every position, a band layer a ring of its window.
#include <omp.h>

#include <type_traits>

#include "simd.h"

enum Kind { DENSE = 0, BAND = 1, COLUMN = 2 };  // attention/patterns.py's KINDS, in order
enum Epilogue { STORE, ADD, SILU };             // what a product does with its result
#define ROWS (REGS == 32 ? 8 : 4)               // batch rows held in registers at once
#define COLS 2                                  // vectors of output columns per tile: a panel

// One layer as decoding.py packs it: ten addresses, then the pattern's kind, the image's side (what a
// column layer strides by) and the cache's slots per (batch, head) (a band layer's ring: its window).
struct Layer {
  int64_t qkv, qkv_bias, proj, proj_bias, fc, fc_bias, out, out_bias, keys, values;
  int64_t kind, side, slots;
};

// The weights come packed in panels (decoding.Fold.packed): a (K, N) matrix as ceil(N / PANEL) panels
// of (K, PANEL) each, contiguous, the last padded with zero columns, and its bias padded likewise, so a tile
// streams its panel from memory in order instead of a short piece of each of K rows.
#define PANEL (COLS * VL)

#if defined(__AVX512BF16__)
// bf16 on a CPU with AVX512-BF16 multiplies in vdpbf16ps (simd.h's dot): bf16 panels come with their rows in
// pairs, (K / 2, PANEL, 2) (a zero row after an odd K), and a product's input rows are rounded to bf16 for it, as
// autocast rounds a linear layer's input (here before the norm's factor, which scales the result); every sum
// stays in float.
template <typename T>
constexpr bool PAIRED = std::is_same<T, bf16>::value;
#else
template <typename T>
constexpr bool PAIRED = false;
#endif
// What a product's input rows are: bf16 where its panels come in pairs, else float as the step holds them.
template <typename T>
using Input = typename std::conditional<PAIRED<T>, bf16, float>::type;

static inline float silu(float a) { return a / (1.f + expf(fminf(-a, 80.f))); }

// out[r][n0 + j] (=, +=, silu of) scale[r] * sum_k x[r][k] panel[k][j] + bias[j] for R rows (x: (R, K), K even
// where the panel comes in pairs; out: rows of N floats), the panel's first `valid` columns.
template <typename T, int R>
static inline void tile(const Input<T>* x, const float* scale, int64_t K, const T* panel, const T* bias, float* out,
                        int64_t N, int64_t n0, int valid, Epilogue epilogue) {
  vec acc[R][COLS] = {};
#if defined(__AVX512BF16__)
  if constexpr (PAIRED<T>) {
    for (int64_t k = 0; k < K; k += 2) {
      pvec wk[COLS];
      for (int v = 0; v < COLS; v++) wk[v] = load_pairs((const pair*)(panel + k * PANEL + 2 * v * VL));
      for (int r = 0; r < R; r++) {
        const pair xr = pair_at(x + r * K + k);
        for (int v = 0; v < COLS; v++) acc[r][v] = dot(acc[r][v], wk[v], xr);
      }
    }
  } else
#endif
  {
    for (int64_t k = 0; k < K; k++) {
      vec wk[COLS];
      for (int v = 0; v < COLS; v++) wk[v] = load(panel + k * PANEL + v * VL);
      for (int r = 0; r < R; r++) {
        vec xr = splat(x[r * K + k]);
        for (int v = 0; v < COLS; v++) acc[r][v] += xr * wk[v];
      }
    }
  }
  for (int r = 0; r < R; r++) {
    float result[PANEL];
    for (int v = 0; v < COLS; v++) {
      vec a = acc[r][v] * splat(scale ? scale[r] : 1.f);
      if (bias) a += load(bias + v * VL);
      store(result + v * VL, a);
    }
    float* o = out + r * N + n0;
    if (epilogue == SILU)  // a loop of its own, so that it takes glibc's vector expf
      for (int j = 0; j < PANEL; j++) result[j] = silu(result[j]);
    if (epilogue == ADD)
      for (int j = 0; j < valid; j++) o[j] += result[j];
    else
      for (int j = 0; j < valid; j++) o[j] = result[j];
  }
}

// The phases of a step whose work Balance shares out: a block's four products and its attention, then the head.
enum Phase { QKV, ATTEND, PROJ, FC, OUT, HEAD, PHASES };

// Shares each phase's units of work (panels, attention groups) out over the region's threads in proportion to
// the speed each thread showed on that phase before, each thread a contiguous run. Why: equal shares make every
// thread wait at the barrier for the slowest, and a thread runs slower wherever its core is shared (a cloud
// host's other guests on the same physical core, an efficiency core of a hybrid CPU) or its memory is farther.
// The rates live in the caller's work buffer, so a call goes on from the last call's. They are double-buffered by
// the phase's use count (each thread's count agrees): a use reads the rates the last use wrote, sealed by the
// barrier that ends every use (`finish`), and writes the other buffer, which nobody reads before that barrier.
struct Balance {
  float* rates;  // shared: (PHASES, 2, stride) units per second, a running average per thread; zero: none yet
  int64_t stride;
  int team, me;
  int64_t uses[PHASES] = {};
  int64_t lo = 0, hi = 0;
  double started = 0;

  Balance(float* rates, int64_t stride)
      : rates(rates), stride(stride), team(omp_get_num_threads()), me(omp_get_thread_num()) {}

  float* buffer(Phase p, int64_t use) const { return rates + (p * 2 + use % 2) * stride; }

  // This thread's run [lo, hi) of `units` at this use of phase p; the clock starts. Each thread's weight is an
  // integer from its rate, at least a quarter of the fastest's, and every thread walks the same integer sums, so
  // that each run ends exactly where the next begins. Every thread gets at least one unit where there are as many,
  // so each is timed again; the rest go by weight.
  void start(Phase p, int64_t units) {
    const float* r = buffer(p, uses[p] + 1);
    float top = 0;
    for (int t = 0; t < team; t++) top = fmaxf(top, r[t]);
    auto weight = [&](int t) { return top > 0 ? (int64_t)(1024.f * fmaxf(r[t], 0.25f * top) / top) : 1024; };
    int64_t total = 0, before = 0;
    for (int t = 0; t < team; t++) total += weight(t);
    const int64_t least = units >= team ? 1 : 0, spare = units - least * team;
    for (int t = 0; t <= me + 1; t++) {
      const int64_t bound = t == team ? units : least * t + (2 * spare * before + total) / (2 * total);
      if (t == me) lo = bound;
      if (t == me + 1) hi = bound;
      if (t < team) before += weight(t);
    }
    started = omp_get_wtime();
  }

  // The clock stops: this thread's rate for phase p, a quarter of it this use's (the last where it had no units);
  // then the threads meet.
  void finish(Phase p) {
    const double seconds = omp_get_wtime() - started;
    const float last = buffer(p, uses[p] + 1)[me];
    const float now = hi > lo && seconds > 0 ? (float)((hi - lo) / seconds) : last;
    buffer(p, uses[p])[me] = last > 0 ? 0.75f * last + 0.25f * now : now;
    uses[p]++;
#pragma omp barrier
  }

  // At the end of a call: where a phase's last rate went to the buffer that a call's first use does not read
  // (an odd count of uses), this thread's entry is copied to the other, so the next call goes on from it.
  void keep() {
    for (int p = 0; p < PHASES; p++)
      if (uses[p] % 2) buffer((Phase)p, 1)[me] = buffer((Phase)p, 0)[me];
  }
};

// The product over every row, its panels shared out over the region's threads by `balance` (call inside one).
// rounded: this thread's room for the input rows in bf16 (rows x (K + 1)), where the panels come in pairs.
template <typename T>
static void product(const float* input, const float* scale, int64_t rows, int64_t K, const T* w, const T* bias,
                    int64_t N, float* out, Epilogue e, Balance& balance, Phase phase, bf16* rounded) {
  const Input<T>* x = (const Input<T>*)input;
  if constexpr (PAIRED<T>) {  // every thread rounds every row for itself: no barrier
    const int64_t even = K + K % 2;
    for (int64_t r = 0; r < rows; r++) {
      int64_t i = 0;
      for (; i + VL <= K; i += VL) store(rounded + r * even + i, load(input + r * K + i));
      for (; i < K; i++) put(rounded + r * even + i, input[r * K + i]);
      if (K % 2) rounded[r * even + K] = 0;
    }
    x = (const Input<T>*)rounded;
    K = even;
  }
  balance.start(phase, (N + PANEL - 1) / PANEL);
  for (int64_t c = balance.lo; c < balance.hi; c++) {
    const T* panel = w + c * K * PANEL;
    const T* b = bias ? bias + c * PANEL : 0;
    const int valid = (int)(N - c * PANEL < PANEL ? N - c * PANEL : PANEL);
    int64_t r = 0;
    for (; r + ROWS <= rows; r += ROWS)
      tile<T, ROWS>(x + r * K, scale ? scale + r : 0, K, panel, b, out + r * N, N, c * PANEL, valid, e);
    const Input<T>* xr = x + r * K; const float* sr = scale ? scale + r : 0; float* o = out + r * N;
    switch (rows - r) {  // the batch's last rows, fewer than ROWS
      case 1: tile<T, 1>(xr, sr, K, panel, b, o, N, c * PANEL, valid, e); break;
      case 2: tile<T, 2>(xr, sr, K, panel, b, o, N, c * PANEL, valid, e); break;
      case 3: tile<T, 3>(xr, sr, K, panel, b, o, N, c * PANEL, valid, e); break;
#if ROWS > 4
      case 4: tile<T, 4>(xr, sr, K, panel, b, o, N, c * PANEL, valid, e); break;
      case 5: tile<T, 5>(xr, sr, K, panel, b, o, N, c * PANEL, valid, e); break;
      case 6: tile<T, 6>(xr, sr, K, panel, b, o, N, c * PANEL, valid, e); break;
      case 7: tile<T, 7>(xr, sr, K, panel, b, o, N, c * PANEL, valid, e); break;
#endif
    }
  }
  balance.finish(phase);
}

// Each row's RMS-norm factor 1 / sqrt(mean(h^2) + eps); every thread computes all of them for itself.
static void norm_scales(const float* h, int64_t rows, int64_t d, float eps, float* scale) {
  for (int64_t r = 0; r < rows; r++) {
    float sum = 0;
    for (int64_t i = 0; i < d; i++) sum += h[r * d + i] * h[r * d + i];
    scale[r] = 1.f / sqrtf(sum / d + eps);
  }
}

// (row, head) pairs a thread attends at once. Each pair reads its keys, then its values, as a stream; a
// core with one stream in flight draws a fraction of what the memory gives it, and several at once come
// near it (a keys-then-values read at a sampling batch's cache: about three times as fast with four).
#define GROUP 4

// Keys attend_vectors scores at once per pair: four for one pair, two where several go together.
constexpr int keys_at_once(int G) { return G == 1 ? 4 : 2; }

// The attention of G (row, head) pairs over `count` cache slots from `first`, `stride` apart, their new keys
// and values already stored: pair g's query q[g] against keys[g], values[g], its output to y[g]. s: scratch
// for G * count scores. The pairs go through each pass together, so that their G streams are read at once.
// q and the outputs stay in registers (NV vectors per pair).
template <typename T, int NV, int G>
static void attend_vectors(const float* const* q, T* const* keys, T* const* values, int64_t first, int64_t count,
                           int64_t stride, float scale, float* s, float* const* y) {
  constexpr int HD = NV * VL, U = keys_at_once(G);
  vec qv[G][NV];
  float top[G];
  for (int g = 0; g < G; g++) {
    for (int v = 0; v < NV; v++) qv[g][v] = load(q[g] + v * VL) * splat(scale);
    top[g] = -INFINITY;
  }
  int64_t j = 0;
  for (; j + U <= count; j += U) {
    vec acc[G][U] = {};
    for (int v = 0; v < NV; v++)
      for (int g = 0; g < G; g++)
        for (int u = 0; u < U; u++) acc[g][u] += qv[g][v] * load(keys[g] + (first + (j + u) * stride) * HD + v * VL);
    for (int g = 0; g < G; g++)
      for (int u = 0; u < U; u++) {
        s[g * count + j + u] = lane_sum(acc[g][u]);
        top[g] = fmaxf(top[g], s[g * count + j + u]);
      }
  }
  for (; j < count; j++)
    for (int g = 0; g < G; g++) {
      vec acc = {};
      for (int v = 0; v < NV; v++) acc += qv[g][v] * load(keys[g] + (first + j * stride) * HD + v * VL);
      s[g * count + j] = lane_sum(acc);
      top[g] = fmaxf(top[g], s[g * count + j]);
    }
  float total[G];
  for (int g = 0; g < G; g++) {
    float* sg = s + g * count;
    float sum = 0;
    for (j = 0; j < count; j++) { sg[j] = exp_nonpositive(sg[j] - top[g]); sum += sg[j]; }
    total[g] = sum;
  }
  vec out[G][NV] = {};
  for (j = 0; j < count; j++)
    for (int g = 0; g < G; g++) {
      const vec p = splat(s[g * count + j]);
      for (int v = 0; v < NV; v++) out[g][v] += p * load(values[g] + (first + j * stride) * HD + v * VL);
    }
  for (int g = 0; g < G; g++)
    for (int v = 0; v < NV; v++) store(y[g] + v * VL, out[g][v] * splat(1.f / total[g]));
}

// Whether attend_vectors<T, NV, G>'s scoring pass (G queries of NV vectors, G * U sums) fits the registers.
constexpr bool fits(int NV, int G) { return G * NV + G * keys_at_once(G) <= REGS - 2; }

// n pairs (at most GROUP) through attend_vectors, as many at once as the registers hold their queries and sums.
template <typename T, int NV>
static void attend_group(int n, const float* const* q, T* const* keys, T* const* values, int64_t first,
                         int64_t count, int64_t stride, float scale, float* s, float* const* y) {
  constexpr int G = fits(NV, GROUP) ? GROUP : fits(NV, 2) ? 2 : 1;
  int g = 0;
  for (; g + G <= n; g += G)
    attend_vectors<T, NV, G>(q + g, keys + g, values + g, first, count, stride, scale, s, y + g);
  for (; g < n; g++) attend_vectors<T, NV, 1>(q + g, keys + g, values + g, first, count, stride, scale, s, y + g);
}

// One pair's attention in plain loops: head sizes that are not whole vectors.
template <typename T>
static void attend_scalar(const float* q, const T* keys, const T* values, int64_t hd, int64_t first, int64_t count,
                          int64_t stride, float scale, float* s, float* y) {
  float top = -INFINITY;
  for (int64_t j = 0; j < count; j++) {
    const T* key = keys + (first + j * stride) * hd;
    float dot = 0;
    for (int64_t i = 0; i < hd; i++) dot += q[i] * widen(key[i]);
    s[j] = dot * scale;
    top = fmaxf(top, s[j]);
  }
  float total = 0;
  for (int64_t j = 0; j < count; j++) { s[j] = exp_nonpositive(s[j] - top); total += s[j]; }
  for (int64_t i = 0; i < hd; i++) y[i] = 0;
  for (int64_t j = 0; j < count; j++) {
    const T* value = values + (first + j * stride) * hd;
    const float p = s[j] / total;
    for (int64_t i = 0; i < hd; i++) y[i] += p * widen(value[i]);
  }
}

// Layer L's attention (head size hd = d / heads) for the n pairs (at most GROUP) from `pair` (row pair / heads,
// head pair % heads): store each pair's new key and value (from qkv) in slot `write`, then attend (above) over
// `count` slots from `first`, `stride` apart, the outputs to y (rows, d).
template <typename T>
static void attend(int64_t pair, int n, const float* qkv, const Layer& L, int64_t d, int64_t heads, int64_t hd,
                   int64_t write, int64_t first, int64_t count, int64_t stride, float scale, float* s, float* y) {
  const float* q[GROUP];
  T *keys[GROUP], *values[GROUP];
  float* out[GROUP];
  for (int g = 0; g < n; g++) {
    const int64_t r = (pair + g) / heads, head = (pair + g) % heads, at = (pair + g) * L.slots * hd;
    q[g] = qkv + r * 3 * d + head * hd;
    keys[g] = (T*)L.keys + at;
    values[g] = (T*)L.values + at;
    out[g] = y + r * d + head * hd;
    for (int64_t i = 0; i < hd; i++) {
      put(keys[g] + write * hd + i, q[g][d + i]);
      put(values[g] + write * hd + i, q[g][2 * d + i]);
    }
  }
  switch (hd % VL ? 0 : hd / VL) {
    case 1: return attend_group<T, 1>(n, q, keys, values, first, count, stride, scale, s, out);
    case 2: return attend_group<T, 2>(n, q, keys, values, first, count, stride, scale, s, out);
    case 3: return attend_group<T, 3>(n, q, keys, values, first, count, stride, scale, s, out);
    case 4: return attend_group<T, 4>(n, q, keys, values, first, count, stride, scale, s, out);
    case 6: return attend_group<T, 6>(n, q, keys, values, first, count, stride, scale, s, out);
    case 8: return attend_group<T, 8>(n, q, keys, values, first, count, stride, scale, s, out);
    default:
      for (int g = 0; g < n; g++) attend_scalar(q[g], keys[g], values[g], hd, first, count, stride, scale, s, out[g]);
  }
}

// The next token of a row of logits as sample.py's draw picks it from softmax(logits / temperature), its
// arithmetic in the same order up to float rounding: the first whose running sum of probabilities reaches
// (1 - u) of their total, u uniform in [0, 1) (every entry it can return has mass); without u, the likeliest
// (greedy). cdf: vocab floats of scratch.
static int64_t pick(const float* logits, int64_t vocab, const float* u, float temperature, float* cdf) {
  int64_t best = 0;
  for (int64_t j = 1; j < vocab; j++) best = logits[j] > logits[best] ? j : best;
  if (!u) return best;
  const float top = logits[best] / temperature;
  float total = 0;
  for (int64_t j = 0; j < vocab; j++) {
    cdf[j] = exp_nonpositive(logits[j] / temperature - top);
    total += cdf[j];
  }
  double sum = 0;  // a scan in double, as torch's cumsum accumulates
  for (int64_t j = 0; j < vocab; j++) cdf[j] = (float)(sum += cdf[j] / total);
  const float target = (1.f - *u) * cdf[vocab - 1];
  int64_t j = 0;
  while (j < vocab - 1 && cdf[j] < target) j++;
  return j;
}

// Floats of scratch per thread: GROUP pairs' scores, or a row's running sums in pick.
static int64_t thread_scratch(int64_t n_ctx, int64_t vocab) { return GROUP * n_ctx > vocab ? GROUP * n_ctx : vocab; }

// Floats each thread owns in a step's work: its scratch, its copy of the rows' norm factors, and room for a
// product's input rows rounded to bf16 (at most rows x (4 d + 1) of them, two to a float); that room goes unused
// where the panels are not paired, kept so that one work size serves both dtypes.
static int64_t thread_floats(int64_t rows, int64_t d, int64_t n_ctx, int64_t vocab) {
  return thread_scratch(n_ctx, vocab) + rows + rows * (2 * d + 1);
}

// Floats a step's work takes (laid out in `step`); Balance's rates follow them in the work buffer.
static int64_t step_work_floats(int64_t rows, int64_t d, int64_t n_ctx, int64_t vocab, int64_t threads) {
  return rows * 9 * d + threads * thread_floats(rows, d, n_ctx, vocab);
}

// One step for every row at input position `pos` (call inside one parallel region): the rows' tokens
// (token r at tokens[r * stride]) through every block to the next pixel's logits (rows, vocab) and, where
// `drawn` is given, the next pixel itself, written to drawn[r * stride] (`pick`, with uniforms[r] for row r,
// or greedy without uniforms). work: decode_work_floats floats, laid out below.
template <typename T>
static void step(const int64_t* tokens, int64_t stride, int64_t pos, const Layer* layers, int64_t n_layer,
                 int64_t rows, int64_t d, int64_t heads, int64_t vocab, int64_t n_ctx, float eps, const float* embed,
                 const float* positions, const T* head, float* logits, const float* uniforms, float temperature,
                 int64_t* drawn, float* work, Balance& balance) {
  const int64_t hd = d / heads, scratch = thread_scratch(n_ctx, vocab);
  const float attention_scale = 1.f / sqrtf((float)hd);
  float *h = work, *qkv = h + rows * d, *y = qkv + rows * 3 * d, *f = y + rows * d, *own = f + rows * 4 * d;
  float* scores = own + omp_get_thread_num() * thread_floats(rows, d, n_ctx, vocab);
  float* scale = scores + scratch;  // this thread's copy of the rows' norm factors
  bf16* rounded = (bf16*)(scale + rows);
  const int64_t pairs = rows * heads, share = (pairs + omp_get_num_threads() - 1) / omp_get_num_threads();
  const int64_t size = share < GROUP ? share : GROUP;  // pairs a group: fewer where pairs are few, so all can work
#pragma omp for schedule(static)
  for (int64_t r = 0; r < rows; r++)
    for (int64_t i = 0; i < d; i++) h[r * d + i] = embed[tokens[r * stride] * d + i] + positions[pos * d + i];
  for (int64_t l = 0; l < n_layer; l++) {
    const Layer& L = layers[l];
    norm_scales(h, rows, d, eps, scale);
    product(h, scale, rows, d, (const T*)L.qkv, (const T*)L.qkv_bias, 3 * d, qkv, STORE, balance, QKV, rounded);
    int64_t write = pos, first = 0, count = pos + 1, spacing = 1;
    if (L.kind == BAND) { write = pos % L.slots; count = pos + 1 < L.slots ? pos + 1 : L.slots; }  // the ring
    if (L.kind == COLUMN) { first = pos % L.side; count = pos / L.side + 1; spacing = L.side; }
    balance.start(ATTEND, (pairs + size - 1) / size);
    for (int64_t group = balance.lo; group < balance.hi; group++) {
      const int64_t pair = group * size;
      attend<T>(pair, (int)(pairs - pair < size ? pairs - pair : size), qkv, L, d, heads, hd, write, first, count,
                spacing, attention_scale, scores, y);
    }
    balance.finish(ATTEND);
    product(y, (const float*)0, rows, d, (const T*)L.proj, (const T*)L.proj_bias, d, h, ADD, balance, PROJ, rounded);
    norm_scales(h, rows, d, eps, scale);
    product(h, scale, rows, d, (const T*)L.fc, (const T*)L.fc_bias, 4 * d, f, SILU, balance, FC, rounded);
    product(f, (const float*)0, rows, 4 * d, (const T*)L.out, (const T*)L.out_bias, d, h, ADD, balance, OUT, rounded);
  }
  norm_scales(h, rows, d, eps, scale);
  product(h, scale, rows, d, head, (const T*)0, vocab, logits, STORE, balance, HEAD, rounded);
  if (drawn) {
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; r++)
      drawn[r * stride] = pick(logits + r * vocab, vocab, uniforms ? uniforms + r : 0, temperature, scores);
  }
}

// `count` steps from input position `pos` in one parallel region. Step s feeds the rows' tokens at
// tokens[r * stride + s]; with `draw` it writes the pixel it picks at tokens[r * stride + s + 1], which the next
// step feeds (uniforms: (count, rows), step s's at uniforms + s * rows, or none for greedy). Without `draw`,
// count is 1. logits (rows, vocab) end holding the last step's. embed (vocab + 1, d: sos last) and positions
// (n_ctx, d) are float; head is (d, vocab). work holds decode_work_floats (below) floats. Returns 1, having
// run nothing, where a token to feed lies outside the vocabulary (or is not sos at position 0).
template <typename T>
static int steps(int64_t* tokens, int64_t stride, int64_t pos, int64_t count, int draw, const Layer* layers,
                 int64_t n_layer, int64_t rows, int64_t d, int64_t heads, int64_t vocab, int64_t n_ctx, float eps,
                 const float* embed, const float* positions, const T* head, float* logits, const float* uniforms,
                 float temperature, float* work, int threads) {
  for (int64_t r = 0; r < rows; r++) {  // position 0 feeds sos, embed's row after the vocabulary
    const int64_t token = tokens[r * stride];
    if (pos == 0 ? token != vocab : token < 0 || token >= vocab) return 1;
  }
#pragma omp parallel num_threads(threads)
  {
    FlushDenormals flush;
    Balance balance(work + step_work_floats(rows, d, n_ctx, vocab, threads), threads);
    for (int64_t s = 0; s < count; s++)
      step(tokens + s, stride, pos + s, layers, n_layer, rows, d, heads, vocab, n_ctx, eps, embed, positions, head,
           logits, uniforms ? uniforms + s * rows : 0, temperature, draw ? tokens + s + 1 : 0, work, balance);
    balance.keep();
  }
  return 0;
}

#define EXPORT(T, SUFFIX)                                                                                           \
  int decode_steps##SUFFIX(int64_t* tokens, int64_t stride, int64_t pos, int64_t count, int draw,                 \
                           const Layer* layers, int64_t n_layer, int64_t rows, int64_t d, int64_t heads,          \
                           int64_t vocab, int64_t n_ctx, float eps, const float* embed, const float* positions,  \
                           const T* head, float* logits, const float* uniforms, float temperature, float* work,   \
                           int threads) {                                                                         \
    return steps(tokens, stride, pos, count, draw, layers, n_layer, rows, d, heads, vocab, n_ctx, eps, embed,      \
                 positions, head, logits, uniforms, temperature, work, threads);                                 \
  }

extern "C" {
EXPORT(float, )
EXPORT(bf16, _bf16)
int decode_panel_width() { return PANEL; }
int decode_paired() { return PAIRED<bf16>; }
int64_t decode_work_floats(int64_t rows, int64_t d, int64_t n_ctx, int64_t vocab, int64_t threads) {
  return step_work_floats(rows, d, n_ctx, vocab, threads) + PHASES * 2 * threads;
}
}
