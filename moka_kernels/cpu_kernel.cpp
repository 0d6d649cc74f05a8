// The CPU path's small-batch kernel: every token's MoKA entries in one call, no torch op between.
//
// On CPU a decode step's adapter work is a few thousand multiply-adds per token and entry; done
// with torch ops it costs more in calls (dispatch, views, gathers) than in arithmetic. This file
// does the same arithmetic as moka_kernels.torch_ops for float32 factors, token by token, reading
// the bank's table and the CPU pack (moka_kernels.bank) in place. Plain C ABI, no torch headers:
// it builds in about a second with the system's g++ (moka_kernels/cpu_kernel.py).
//
// For token t with slot s >= 0 and each used entry of s (table row, M1 > 0; field order as
// moka_kernels.bank; A_START and B_START index the slot's packed row, the CPU pack's layout),
// y[t, OUT_OFFSET : +M1*M2] += kron(A, B) @ x[t, IN_OFFSET : +N1*N2]:
//   low-rank (N1 == M2 == 1, A stored): U (M1, RANK) @ (V (RANK, N2) @ x)
//   identity A:                         X (N1, N2) @ B^T, row-major (M1 == N1)
//   A first:                            (A @ X) @ B^T
//   B first:                            A @ (X @ B^T)
#include <cstdint>
#include <vector>

namespace {

constexpr int kFields = 12;  // moka_kernels.bank.NUM_FIELDS

inline float dot(const float* __restrict__ a, const float* __restrict__ b, int64_t n) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t k = 0; k < n; ++k) acc += a[k] * b[k];
  return acc;
}

// y[0:m] += sum_k w[k] * rows[k * ld : k * ld + m], for k < K: a vector times a matrix, by
// blocks of W output columns held in registers over the whole sum (the matrices here are a few
// dozen columns wide: a loop over rows of y would spend its time loading and storing y).
template <int W>
inline int64_t vecmat_blocks(const float* __restrict__ w, int64_t K, const float* __restrict__ rows,
                             int64_t ld, float* __restrict__ y, int64_t c, int64_t m) {
  for (; c + W <= m; c += W) {
    float acc[W] = {};
    for (int64_t k = 0; k < K; ++k) {
      const float wk = w[k];
      const float* r = rows + k * ld + c;
#pragma omp simd
      for (int j = 0; j < W; ++j) acc[j] += wk * r[j];
    }
#pragma omp simd
    for (int j = 0; j < W; ++j) y[c + j] += acc[j];
  }
  return c;
}

inline void vecmat(const float* __restrict__ w, int64_t K, const float* __restrict__ rows,
                   int64_t ld, float* __restrict__ y, int64_t m) {
  int64_t c = vecmat_blocks<32>(w, K, rows, ld, y, 0, m);
  c = vecmat_blocks<16>(w, K, rows, ld, y, c, m);
  c = vecmat_blocks<8>(w, K, rows, ld, y, c, m);
  for (; c < m; ++c) {
    float acc = 0.0f;
    for (int64_t k = 0; k < K; ++k) acc += w[k] * rows[k * ld + c];
    y[c] += acc;
  }
}

struct Scratch {
  std::vector<float> z, t;  // a low-rank entry's V x; a Kronecker entry's intermediate product
};

// One entry for one token. Factors as the CPU pack stores them (moka_kernels.bank.CpuPack):
// A (m1, n1) and B^T (n2, m2); a low-rank entry's U^T (r, m) and V (r, n). Every product then
// reads contiguous rows: long dot products, or a vector times a matrix (vecmat).
void apply_entry(const int32_t* r, const float* pack, const float* xt, float* yt, Scratch& s) {
  const int64_t m1 = r[0], n1 = r[1], m2 = r[2], n2 = r[3];
  const bool identity = r[4] != 0, a_first = r[5] != 0;
  const float* x = xt + r[8];
  float* y = yt + r[6];
  const float* a = pack + r[9];
  const float* bt = pack + r[10];
  const int64_t rank = r[11];
  if (!identity && n1 == 1 && m2 == 1) {  // low-rank: z = V x, y += U z = z^T U^T
    s.z.resize(rank);
    for (int64_t j = 0; j < rank; ++j) s.z[j] = dot(bt + j * n2, x, n2);
    vecmat(s.z.data(), rank, a, m1, y, m1);
  } else if (identity) {  // Y (n1, m2) = X B^T: row p is x_p^T B^T
    for (int64_t p = 0; p < n1; ++p) vecmat(x + p * n2, n2, bt, m2, y + p * m2, m2);
  } else if (a_first) {  // T (m1, n2) = A X; Y = T B^T
    s.t.assign(m1 * n2, 0.0f);
    float* t = s.t.data();
    for (int64_t i = 0; i < m1; ++i) vecmat(a + i * n1, n1, x, n2, t + i * n2, n2);
    for (int64_t i = 0; i < m1; ++i) vecmat(t + i * n2, n2, bt, m2, y + i * m2, m2);
  } else {  // T (n1, m2) = X B^T; Y = A T
    s.t.assign(n1 * m2, 0.0f);
    float* t = s.t.data();
    for (int64_t p = 0; p < n1; ++p) vecmat(x + p * n2, n2, bt, m2, t + p * m2, m2);
    for (int64_t i = 0; i < m1; ++i) vecmat(a + i * n1, n1, t, m2, y + i * m2, m2);
  }
}

}  // namespace

extern "C" {

// The ABI version moka_kernels/cpu_kernel.py checks after loading the library.
int moka_cpu_kernel_version() { return 2; }
int moka_cpu_kernel_fields() { return kFields; }

// x: (n, x_stride) float32 rows; y: (n, y_stride) float32 rows, added into in place; slots: n
// int64; pack: (slots, pack_stride) float32; table: (slots, max_entries, 12) int32, contiguous.
void moka_apply_f32(int64_t n, const float* x, int64_t x_stride, float* y, int64_t y_stride,
                    const int64_t* slots, const float* pack, int64_t pack_stride,
                    const int32_t* table, int64_t max_entries) {
  Scratch scratch;
  for (int64_t t = 0; t < n; ++t) {
    const int64_t s = slots[t];
    if (s < 0) continue;
    const int32_t* rows = table + s * max_entries * kFields;
    for (int64_t e = 0; e < max_entries && rows[e * kFields] > 0; ++e)
      apply_entry(rows + e * kFields, pack + s * pack_stride, x + t * x_stride, y + t * y_stride,
                  scratch);
  }
}

}  // extern "C"
