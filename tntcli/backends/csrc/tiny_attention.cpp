// Softmax attention over many tiny sequences on CPU, forward and backward: TNT's inner transformer, where every
// (patch, head) pair is 16 words with head dim 6 (TNT-S) or 10 (TNT-B), 25,088 pairs per layer at batch 32.
// aten runs it as three layout copies and two batched matmuls of 16 x 6 matrices, slow at this size; here one
// pass per pair reads q, k and v straight from the fused qkv rows, keeps everything in registers and L1, and
// writes the heads' output (backward: the qkv gradient) in the layout the next linear reads.
//
// Built at run time by tntcli/backends/kernels.py, which prepends TNT_TINY_SHAPES, the (words, head dim) pairs
// compiled. Scores are held transposed, st[key][query], so the softmax vectorises over the queries. Backward
// recomputes the probabilities from the per-query max and 1/sum that the forward saves (2 floats a query, not
// the 16 x 16 probabilities).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>

namespace {

using Vec = at::vec::Vectorized<float>;

// x[i] = exp(x[i] - m[i]) * r[i] for i < n (r may be null); exp_row: the same with one m and r for all i.
inline void exp_shifted(float* x, const float* m, const float* r, int n) {
  for (int i = 0; i < n; i += Vec::size()) {
    const int c = std::min<int>(Vec::size(), n - i);
    Vec e = (Vec::loadu(x + i, c) - Vec::loadu(m + i, c)).exp_u20();
    if (r) e = e * Vec::loadu(r + i, c);
    e.store(x + i, c);
  }
}

inline void exp_row(float* x, float m, float r, int n) {
  for (int i = 0; i < n; i += Vec::size()) {
    const int c = std::min<int>(Vec::size(), n - i);
    ((Vec::loadu(x + i, c) - Vec(m)).exp_u20() * Vec(r)).store(x + i, c);
  }
}

// One (patch, head): q, k, v loaded transposed, [dim][word], so that every product below vectorises over words.
template <int N, int D>
struct Head {
  float qt[D][N], kt[D][N], vt[D][N];   // q pre-scaled
  float st[N][N];                        // st[key][query]: scores, then probabilities
  float m[N], r[N];                      // per query: max score and 1 / sum of exp

  // base: word 0's q of this head in the fused rows (N, 3, H, D); row: 3 * H * D; hd: H * D.
  void load(const float* base, int64_t row, int64_t hd, float scale) {
    for (int i = 0; i < N; ++i)
      for (int d = 0; d < D; ++d) {
        qt[d][i] = base[i * row + d] * scale;
        kt[d][i] = base[i * row + hd + d];
        vt[d][i] = base[i * row + 2 * hd + d];
      }
  }
  // st[j][i] = sum_d k[j][d] q[i][d]
  void scores() {
    for (int j = 0; j < N; ++j) {
      float s[N] = {};
      for (int d = 0; d < D; ++d) {
        const float kj = kt[d][j];
#pragma omp simd
        for (int i = 0; i < N; ++i) s[i] += kj * qt[d][i];
      }
      std::copy(s, s + N, st[j]);
    }
  }
  void softmax() {
    for (int i = 0; i < N; ++i) m[i] = st[0][i];
    for (int j = 1; j < N; ++j)
#pragma omp simd
      for (int i = 0; i < N; ++i) m[i] = std::max(m[i], st[j][i]);
    float l[N] = {};
    for (int j = 0; j < N; ++j) {
      exp_shifted(st[j], m, nullptr, N);
#pragma omp simd
      for (int i = 0; i < N; ++i) l[i] += st[j][i];
    }
    for (int i = 0; i < N; ++i) r[i] = 1.f / l[i];
    for (int j = 0; j < N; ++j)
#pragma omp simd
      for (int i = 0; i < N; ++i) st[j][i] *= r[i];
  }
  void probs(const float* stats) {      // stats: m[N] then r[N], saved by the forward
    for (int j = 0; j < N; ++j) exp_shifted(st[j], stats, stats + N, N);
  }
};

template <int N, int D>
void forward_kernel(const float* qkv, float* out, float* stats, int64_t P, int64_t H, float scale) {
  const int64_t hd = H * D, row = 3 * hd;
  at::parallel_for(0, P * H, 16, [&](int64_t begin, int64_t end) {
    Head<N, D> t;
    for (int64_t ph = begin; ph < end; ++ph) {
      const int64_t p = ph / H, h = ph % H;
      t.load(qkv + p * N * row + h * D, row, hd, scale);
      t.scores();
      t.softmax();
      float* o = out + p * N * hd + h * D;
      for (int d = 0; d < D; ++d) {     // o[i][d] = sum_j p[i][j] v[j][d]
        float acc[N] = {};
        for (int j = 0; j < N; ++j) {
          const float vj = t.vt[d][j];
#pragma omp simd
          for (int i = 0; i < N; ++i) acc[i] += vj * t.st[j][i];
        }
        for (int i = 0; i < N; ++i) o[i * hd + d] = acc[i];
      }
      float* s = stats + ph * 2 * N;
      std::copy(t.m, t.m + N, s);
      std::copy(t.r, t.r + N, s + N);
    }
  });
}

template <int N, int D>
void backward_kernel(const float* grad, const float* qkv, const float* stats, float* dqkv, int64_t P, int64_t H,
                     float scale) {
  const int64_t hd = H * D, row = 3 * hd;
  at::parallel_for(0, P * H, 16, [&](int64_t begin, int64_t end) {
    Head<N, D> t;
    float gt[D][N];                      // output gradient, transposed
    float dst[N][N];                     // dS^T[key][query]
    float pn[N][N], dsn[N][N];           // P and dS untransposed, [query][key]
    for (int64_t ph = begin; ph < end; ++ph) {
      const int64_t p = ph / H, h = ph % H;
      const float* saved = stats + ph * 2 * N;
      t.load(qkv + p * N * row + h * D, row, hd, scale);
      t.scores();
      t.probs(saved);
      const float* g = grad + p * N * hd + h * D;
      for (int i = 0; i < N; ++i)
        for (int d = 0; d < D; ++d) gt[d][i] = g[i * hd + d];
      // dP^T[j][i] = sum_d v[j][d] dO[i][d];  di[i] = sum_j P[i][j] dP[i][j];  dS = P * (dP - di)
      float di[N] = {};
      for (int j = 0; j < N; ++j) {
        float dp[N] = {};
        for (int d = 0; d < D; ++d) {
          const float vj = t.vt[d][j];
#pragma omp simd
          for (int i = 0; i < N; ++i) dp[i] += vj * gt[d][i];
        }
#pragma omp simd
        for (int i = 0; i < N; ++i) { dst[j][i] = dp[i]; di[i] += t.st[j][i] * dp[i]; }
      }
      for (int j = 0; j < N; ++j)
#pragma omp simd
        for (int i = 0; i < N; ++i) dst[j][i] = t.st[j][i] * (dst[j][i] - di[i]);
      float* out = dqkv + p * N * row + h * D;
      for (int d = 0; d < D; ++d) {     // dq[i][d] = scale * sum_j dS[i][j] k[j][d]
        float acc[N] = {};
        for (int j = 0; j < N; ++j) {
          const float kj = t.kt[d][j];
#pragma omp simd
          for (int i = 0; i < N; ++i) acc[i] += kj * dst[j][i];
        }
        for (int i = 0; i < N; ++i) out[i * row + d] = acc[i] * scale;
      }
      // dk and dv sum over queries: recompute P and dS untransposed (cheaper than transposing them) so that these
      // products vectorise over keys.
      for (int i = 0; i < N; ++i) {
        float sc[N] = {}, dp[N] = {};
        for (int d = 0; d < D; ++d) {
          const float qi = t.qt[d][i], gi = gt[d][i];
#pragma omp simd
          for (int j = 0; j < N; ++j) { sc[j] += qi * t.kt[d][j]; dp[j] += gi * t.vt[d][j]; }
        }
        exp_row(sc, saved[i], saved[N + i], N);
#pragma omp simd
        for (int j = 0; j < N; ++j) { pn[i][j] = sc[j]; dsn[i][j] = sc[j] * (dp[j] - di[i]); }
      }
      for (int d = 0; d < D; ++d) {     // dk[j][d] = sum_i dS[i][j] q[i][d] (q scaled); dv[j][d] = sum_i P[i][j] dO[i][d]
        float ak[N] = {}, av[N] = {};
        for (int i = 0; i < N; ++i) {
          const float qi = t.qt[d][i], gi = gt[d][i];
#pragma omp simd
          for (int j = 0; j < N; ++j) { ak[j] += qi * dsn[i][j]; av[j] += gi * pn[i][j]; }
        }
        for (int j = 0; j < N; ++j) { out[j * row + hd + d] = ak[j]; out[j * row + 2 * hd + d] = av[j]; }
      }
    }
  });
}

void check(const at::Tensor& qkv, int64_t heads) {
  TORCH_CHECK(qkv.device().is_cpu() && qkv.scalar_type() == at::kFloat && qkv.is_contiguous() && qkv.dim() == 3,
              "tiny_attention: qkv must be a contiguous float32 CPU tensor (patches, words, 3 * dim)");
  TORCH_CHECK(qkv.size(2) % (3 * heads) == 0, "tiny_attention: 3 * dim is not divisible by 3 * heads");
}

std::tuple<at::Tensor, at::Tensor> tiny_attention(const at::Tensor& qkv, int64_t heads, double scale) {
  check(qkv, heads);
  const int64_t P = qkv.size(0), n = qkv.size(1), c = qkv.size(2) / 3, d = c / heads;
  auto out = at::empty({P, n, c}, qkv.options());
  auto stats = at::empty({P, heads, 2, n}, qkv.options());
#define TNT_FORWARD(N_, D_)                                                                              \
  if (n == N_ && d == D_) {                                                                              \
    forward_kernel<N_, D_>(qkv.data_ptr<float>(), out.data_ptr<float>(), stats.data_ptr<float>(), P, heads, \
                           static_cast<float>(scale));                                                  \
    return {out, stats};                                                                                 \
  }
  TNT_TINY_SHAPES(TNT_FORWARD)
  C10_THROW_ERROR(ValueError, c10::str("tiny_attention: no kernel for ", n, " words of head dim ", d));
}

at::Tensor tiny_attention_backward(const at::Tensor& grad, const at::Tensor& qkv, const at::Tensor& stats,
                                   int64_t heads, double scale) {
  check(qkv, heads);
  const int64_t P = qkv.size(0), n = qkv.size(1), c = qkv.size(2) / 3, d = c / heads;
  TORCH_CHECK(grad.sizes() == at::IntArrayRef({P, n, c}) && grad.scalar_type() == at::kFloat,
              "tiny_attention_backward: grad must be float32 of shape (patches, words, dim)");
  TORCH_CHECK(stats.sizes() == at::IntArrayRef({P, heads, 2, n}) && stats.is_contiguous(),
              "tiny_attention_backward: stats are not the forward's");
  auto g = grad.contiguous();
  auto dqkv = at::empty_like(qkv);
#define TNT_BACKWARD(N_, D_)                                                                              \
  if (n == N_ && d == D_) {                                                                               \
    backward_kernel<N_, D_>(g.data_ptr<float>(), qkv.data_ptr<float>(), stats.data_ptr<float>(),         \
                            dqkv.data_ptr<float>(), P, heads, static_cast<float>(scale));               \
    return dqkv;                                                                                          \
  }
  TNT_TINY_SHAPES(TNT_BACKWARD)
  C10_THROW_ERROR(ValueError, c10::str("tiny_attention: no kernel for ", n, " words of head dim ", d));
}

}  // namespace

TORCH_LIBRARY(tnt, m) {
  m.def("tiny_attention(Tensor qkv, int heads, float scale) -> (Tensor, Tensor)");
  m.def("tiny_attention_backward(Tensor grad, Tensor qkv, Tensor stats, int heads, float scale) -> Tensor");
}
TORCH_LIBRARY_IMPL(tnt, CPU, m) {
  m.impl("tiny_attention", &tiny_attention);
  m.impl("tiny_attention_backward", &tiny_attention_backward);
}
