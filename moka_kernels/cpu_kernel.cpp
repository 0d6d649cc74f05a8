// The CPU path's kernel: every token's MoKA entries in one call, no torch op between.
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

// z[j] = rows[j * ld : j * ld + n] . x for j < count, four rows per pass over x: four independent
// sums in flight instead of one chain of dependent adds (a decode step is latency-bound).
inline void dots(const float* __restrict__ rows, int64_t ld, int64_t count,
                 const float* __restrict__ x, int64_t n, float* __restrict__ z) {
  int64_t j = 0;
  for (; j + 4 <= count; j += 4) {
    const float* r0 = rows + j * ld;
    const float* r1 = r0 + ld;
    const float* r2 = r1 + ld;
    const float* r3 = r2 + ld;
    float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
    for (int64_t k = 0; k < n; ++k) {
      a0 += r0[k] * x[k];
      a1 += r1[k] * x[k];
      a2 += r2[k] * x[k];
      a3 += r3[k] * x[k];
    }
    z[j] = a0;
    z[j + 1] = a1;
    z[j + 2] = a2;
    z[j + 3] = a3;
  }
  for (; j < count; ++j) z[j] = dot(rows + j * ld, x, n);
}

// Y[0:RB, c:c+CW] += W[0:RB, 0:K] @ R[0:K, c:c+CW]: RB output rows share every load of R, and
// RB x CW accumulators stay in registers over the whole sum.
template <int RB, int CW>
inline void mm_tile(const float* __restrict__ w, int64_t ldw, int64_t K,
                    const float* __restrict__ r, int64_t ldr, float* __restrict__ y, int64_t ldy,
                    int64_t c) {
  float acc[RB][CW] = {};
  for (int64_t k = 0; k < K; ++k) {
    const float* rk = r + k * ldr + c;
    for (int u = 0; u < RB; ++u) {
      const float wk = w[u * ldw + k];
#pragma omp simd
      for (int j = 0; j < CW; ++j) acc[u][j] += wk * rk[j];
    }
  }
  for (int u = 0; u < RB; ++u) {
#pragma omp simd
    for (int j = 0; j < CW; ++j) y[u * ldy + c + j] += acc[u][j];
  }
}

// RB rows of Y += W @ R over all N columns: tiles of 32 (one row), 16, 8 and 4 columns, then
// one column at a time.
template <int RB>
inline void mm_rows(const float* __restrict__ w, int64_t ldw, int64_t K,
                    const float* __restrict__ r, int64_t ldr, float* __restrict__ y, int64_t ldy,
                    int64_t N) {
  int64_t c = 0;
  if (RB == 1)
    for (; c + 32 <= N; c += 32) mm_tile<RB, 32>(w, ldw, K, r, ldr, y, ldy, c);
  for (; c + 16 <= N; c += 16) mm_tile<RB, 16>(w, ldw, K, r, ldr, y, ldy, c);
  for (; c + 8 <= N; c += 8) mm_tile<RB, 8>(w, ldw, K, r, ldr, y, ldy, c);
  for (; c + 4 <= N; c += 4) mm_tile<RB, 4>(w, ldw, K, r, ldr, y, ldy, c);
  for (; c < N; ++c)
    for (int u = 0; u < RB; ++u) {
      float acc = 0.0f;
      for (int64_t k = 0; k < K; ++k) acc += w[u * ldw + k] * r[k * ldr + c];
      y[u * ldy + c] += acc;
    }
}

// Y (M, N) += W (M, K) @ R (K, N), all row-major with leading dimensions ldw, ldr, ldy: four
// rows at a time, then the rest one by one. Every product of the kernel is one of these.
inline void matmul_add(int64_t M, int64_t N, int64_t K, const float* __restrict__ w, int64_t ldw,
                       const float* __restrict__ r, int64_t ldr, float* __restrict__ y,
                       int64_t ldy) {
  int64_t i = 0;
  for (; i + 4 <= M; i += 4) mm_rows<4>(w + i * ldw, ldw, K, r, ldr, y + i * ldy, ldy, N);
  for (; i < M; ++i) mm_rows<1>(w + i * ldw, ldw, K, r, ldr, y + i * ldy, ldy, N);
}

struct Scratch {
  std::vector<float> z, t;  // a low-rank entry's V x; a Kronecker entry's intermediate product
};

// One entry for one token. Factors as the CPU pack stores them (moka_kernels.bank.CpuPack):
// A (m1, n1) and B^T (n2, m2); a low-rank entry's U^T (r, m) and V (r, n). Every product then
// reads contiguous rows: dot products (dots), or small row-major products (matmul_add).
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
    dots(bt, n2, rank, x, n2, s.z.data());
    matmul_add(1, m1, rank, s.z.data(), rank, a, m1, y, m1);
  } else if (identity) {  // Y (n1, m2) = X B^T
    matmul_add(n1, m2, n2, x, n2, bt, m2, y, m2);
  } else if (a_first) {  // T (m1, n2) = A X; Y = T B^T
    s.t.assign(m1 * n2, 0.0f);
    float* t = s.t.data();
    matmul_add(m1, n2, n1, a, n1, x, n2, t, n2);
    matmul_add(m1, m2, n2, t, n2, bt, m2, y, m2);
  } else {  // T (n1, m2) = X B^T; Y = A T
    s.t.assign(n1 * m2, 0.0f);
    float* t = s.t.data();
    matmul_add(n1, m2, n2, x, n2, bt, m2, t, m2);
    matmul_add(m1, m2, n1, a, n1, t, m2, y, m2);
  }
}

}  // namespace

extern "C" {

// The ABI version moka_kernels/cpu_kernel.py checks after loading the library.
int moka_cpu_kernel_version() { return 3; }
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
