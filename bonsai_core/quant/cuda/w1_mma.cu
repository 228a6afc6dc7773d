// W1A16 for Q1_0 weights on tensor cores (mma.sync m16n8k16, fp32 accumulation), sm80 and newer.
//
//   y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]),   w[n, k] = (bit ? +d : -d),  d = d[n, k / 128]
//
// Built at first use by cuda_w1.py (nvcc, for the card it runs on) and called through ctypes: no
// PyTorch headers, so it builds in seconds. Layouts are the engine's (q1_0.py): x [M, K] row-major
// 16-bit with row stride ldx; qs uint8 [N, NG * 16] (bit j of a group's byte i is weight 8 i + j,
// LSB first); d fp16 [N, NG]; y [M, N] with row stride ldy, the dtype of x; bias [N] of that dtype.
//
// The unpack costs a few integer operations per pair of weights and never leaves registers. The
// mma's K order inside a 128-weight group is permuted, the same way for both operands (a sum does
// not care): lane t4 of a quad holds weights 32 t4 .. 32 t4 + 31 of the group (one 32-bit word of
// qs) and the matching 32 activations (four 16-byte loads per row), so every load is a plain
// vector load and a byte of bits feeds two mmas. B is built as +-d itself (d rounded to the
// compute dtype, as the dense weight holds it), so the mma accumulates the finished product and
// there is no per-group rescale.
//
// Split-K: blockIdx.y takes a range of groups; with splits > 1 each block writes fp32 partials and
// the last block of a tile to arrive (a per-tile counter, reset by that block) sums them in split
// order, adds the bias and writes y. The sum is deterministic; the counters must not be shared by
// two launches running at once (the engine runs its layers on one stream).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

namespace {

constexpr int WARPS = 4;  // a block: 4 warps side by side along N, each NT n8 tiles (32 NT columns)

template <bool BF16>
__device__ __forceinline__ void mma16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
  if constexpr (BF16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}

// The pair of -d, -d in the compute dtype, as one 32-bit register.
template <bool BF16>
__device__ __forceinline__ uint32_t neg_pair(__half d) {
  uint16_t bits;
  if constexpr (BF16) {
    __nv_bfloat16 b = __float2bfloat16_rn(__half2float(d));
    bits = *reinterpret_cast<uint16_t*>(&b);
  } else {
    bits = *reinterpret_cast<uint16_t*>(&d);
  }
  bits ^= 0x8000u;
  return (uint32_t)bits | ((uint32_t)bits << 16);
}

// Bits 0 and 1 of t as the sign flips of the low and high half: a set bit turns -d into +d.
__device__ __forceinline__ uint32_t flips(uint32_t t) {
  return ((t << 15) & 0x00008000u) | ((t << 30) & 0x80000000u);
}

template <typename T>
__device__ __forceinline__ uint32_t pack_out(float a, float b) {
  uint32_t out;
  if constexpr (std::is_same<T, __half>::value) {
    __half2 v = __floats2half2_rn(a, b);
    out = *reinterpret_cast<uint32_t*>(&v);
  } else {
    __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
    out = *reinterpret_cast<uint32_t*>(&v);
  }
  return out;
}

__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v) {
  if constexpr (std::is_same<T, __half>::value) {
    return __float2half_rn(v);
  } else {
    return __float2bfloat16_rn(v);
  }
}

template <typename T, int MT, int NT, bool WIDE>
__global__ void __launch_bounds__(WARPS * 32) w1a16_kernel(
    const T* __restrict__ x, const uint32_t* __restrict__ qs, const __half* __restrict__ d,
    const T* __restrict__ bias, T* __restrict__ y, float* __restrict__ part, int* __restrict__ counters,
    int M, int N, int K, int NG, int ldx, int ldy, int units_per_split) {
  // A unit is what a quad of lanes covers per iteration: one group (each lane 32 of its weights, one
  // 32-bit word of bits) or, WIDE, four groups (each lane one whole group, a 16-byte load of bits,
  // with its own scale: B holds +-d, so lanes of one mma may hold different groups).
  constexpr bool BF16 = std::is_same<T, __nv_bfloat16>::value;
  constexpr int WORDS = WIDE ? 4 : 1;  // 32-bit words of bits a lane holds per unit and n8 tile
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t4 = lane & 3;
  constexpr int BLOCK_N = WARPS * NT * 8;
  const int n_block = blockIdx.x * BLOCK_N + warp * (NT * 8);
  const int m_block = blockIdx.z * (16 * MT);
  const int splits = gridDim.y;
  const int units = WIDE ? (NG + 3) / 4 : NG;
  const int u0 = blockIdx.y * units_per_split;
  const int u1 = min(units, u0 + units_per_split);

  float acc[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

  // This lane's weight rows (one per n8 tile; rows past N read row N - 1 and are never stored).
  const uint32_t* qrow[NT];
  const __half* drow[NT];
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    const int n = min(n_block + j * 8 + g, N - 1);
    qrow[j] = qs + (size_t)n * NG * 4;
    drow[j] = d + (size_t)n * NG;
  }
  // This lane's activation rows: g and g + 8 of each m16 tile (rows past M read as zero).
  const T* xrow[MT][2];
  bool xok[MT][2];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int m = m_block + i * 16 + g + h * 8;
      xok[i][h] = m < M;
      xrow[i][h] = x + (size_t)(xok[i][h] ? m : 0) * ldx;
    }

  // The lane's group in unit u and where its weights start (in weights from the row's start).
  auto lane_group = [&](int u) { return WIDE ? 4 * u + t4 : u; };
  auto lane_k = [&](int u) { return WIDE ? (4 * u + t4) * 128 : u * 128 + 32 * t4; };
  // Bits and scale of unit u (a group past NG, WIDE only, holds zero bits and a zero scale).
  auto load_unit = [&](int u, uint32_t (&b)[NT][WORDS], __half (&dh)[NT]) {
    const int grp = lane_group(u);
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      if constexpr (WIDE) {
        if (grp < NG) {
          const uint4 v = __ldg(reinterpret_cast<const uint4*>(qrow[j] + grp * 4));
          b[j][0] = v.x, b[j][1] = v.y, b[j][2] = v.z, b[j][3] = v.w;
          dh[j] = drow[j][grp];
        } else {
          b[j][0] = b[j][1] = b[j][2] = b[j][3] = 0u;
          dh[j] = __float2half(0.f);
        }
      } else {
        b[j][0] = __ldg(qrow[j] + grp * 4 + t4);
        dh[j] = drow[j][grp];
      }
    }
  };

  // The next unit's bits and scales are loaded while this unit's mmas run (memory latency is what
  // a 1-bit GEMV waits on: the weights themselves are few bytes).
  uint32_t bits[NT][WORDS], next_bits[NT][WORDS], base[NT];
  __half next_d[NT];
  if (u0 < u1) load_unit(u0, next_bits, next_d);
  for (int u = u0; u < u1; ++u) {
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
      for (int w = 0; w < WORDS; ++w) bits[j][w] = next_bits[j][w];
      base[j] = neg_pair<BF16>(next_d[j]);
    }
    if (u + 1 < u1) load_unit(u + 1, next_bits, next_d);
    const int kl = lane_k(u);
#pragma unroll
    for (int w = 0; w < WORDS; ++w) {
      uint4 xa[4][MT][2];  // four steps' activations first: their loads overlap
#pragma unroll
      for (int s = 0; s < 4; ++s)
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int k = kl + 32 * w + 8 * s;
            if (xok[i][h] && k < K) {
              xa[s][i][h] = __ldg(reinterpret_cast<const uint4*>(xrow[i][h] + k));
            } else {
              xa[s][i][h] = make_uint4(0u, 0u, 0u, 0u);
            }
          }
#pragma unroll
      for (int s = 0; s < 4; ++s) {
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          const uint32_t byte = bits[j][w] >> (8 * s);
          const uint32_t b0 = base[j] ^ flips(byte), b1 = base[j] ^ flips(byte >> 2);
          const uint32_t b2 = base[j] ^ flips(byte >> 4), b3 = base[j] ^ flips(byte >> 6);
#pragma unroll
          for (int i = 0; i < MT; ++i) {
            mma16816<BF16>(acc[i][j], xa[s][i][0].x, xa[s][i][1].x, xa[s][i][0].y, xa[s][i][1].y, b0, b1);
            mma16816<BF16>(acc[i][j], xa[s][i][0].z, xa[s][i][1].z, xa[s][i][0].w, xa[s][i][1].w, b2, b3);
          }
        }
      }
    }
  }

  // acc[i][j]: rows m_block + 16 i + g (+ 8 for e = 2, 3), columns n_block + 8 j + 2 t4 (+ 1 for odd e).
  auto each_output = [&](auto&& f) {  // f(acc element, m, n) for each element inside [M, N]
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int m = m_block + i * 16 + g + (e >> 1) * 8, n = n_block + j * 8 + 2 * t4 + (e & 1);
          if (m < M && n < N) f(acc[i][j][e], m, n);
        }
  };
  if (splits > 1) {
    float* mine = part + (size_t)blockIdx.y * M * N;
    each_output([&](float& v, int m, int n) { __stcg(mine + (size_t)m * N + n, v); });
    __threadfence();
    __syncthreads();
    __shared__ int last;
    const int tile = blockIdx.z * gridDim.x + blockIdx.x;
    if (threadIdx.x == 0) last = atomicAdd(counters + tile, 1) == splits - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    each_output([&](float& v, int m, int n) {
      float sum = 0.f;
      for (int sp = 0; sp < splits; ++sp) sum += __ldcg(part + ((size_t)sp * M + m) * N + n);
      v = sum;
    });
    if (threadIdx.x == 0) counters[tile] = 0;  // ready for the next launch
  }

#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int m = m_block + i * 16 + g + h * 8, n = n_block + j * 8 + 2 * t4;
        if (m >= M || n >= N) continue;
        float a = acc[i][j][2 * h], b = acc[i][j][2 * h + 1];
        if (bias != nullptr) {
          a += to_float(bias[n]);
          if (n + 1 < N) b += to_float(bias[n + 1]);
        }
        T* out = y + (size_t)m * ldy + n;
        if (n + 1 < N && ((reinterpret_cast<uintptr_t>(out) & 3) == 0)) {
          *reinterpret_cast<uint32_t*>(out) = pack_out<T>(a, b);
        } else {
          out[0] = from_float<T>(a);
          if (n + 1 < N) out[1] = from_float<T>(b);
        }
      }
}

template <typename T, int MT, int NT, bool WIDE>
cudaError_t launch(const void* x, const void* qs, const void* d, const void* bias, void* y, float* part,
                   int* counters, int M, int N, int K, int NG, int ldx, int ldy, int splits, int units_per_split,
                   cudaStream_t stream) {
  constexpr int BLOCK_N = WARPS * NT * 8;
  dim3 grid((N + BLOCK_N - 1) / BLOCK_N, splits, (M + 16 * MT - 1) / (16 * MT));
  w1a16_kernel<T, MT, NT, WIDE><<<grid, WARPS * 32, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const uint32_t*>(qs), static_cast<const __half*>(d),
      static_cast<const T*>(bias), static_cast<T*>(y), part, counters, M, N, K, NG, ldx, ldy, units_per_split);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_tiles(int mt, int nt, bool wide, const void* x, const void* qs, const void* d, const void* bias, void* y,
                         float* part, int* counters, int M, int N, int K, int NG, int ldx, int ldy, int splits,
                         int gps, cudaStream_t stream) {
#define BONSAI_W1_CASE(MT_, NT_, WIDE_)                                                                   \
  if (mt == MT_ && nt == NT_ && wide == WIDE_)                                                             \
    return launch<T, MT_, NT_, WIDE_>(x, qs, d, bias, y, part, counters, M, N, K, NG, ldx, ldy, splits, gps, \
                                      stream);
  BONSAI_W1_CASE(1, 1, false)
  BONSAI_W1_CASE(1, 4, false)
  BONSAI_W1_CASE(2, 1, false)
  BONSAI_W1_CASE(2, 4, false)
  BONSAI_W1_CASE(4, 1, false)
  BONSAI_W1_CASE(4, 4, false)
  BONSAI_W1_CASE(1, 1, true)  // wide lanes up to 32 tokens only: with four m16 tiles they spill
  BONSAI_W1_CASE(1, 4, true)
  BONSAI_W1_CASE(2, 1, true)
  BONSAI_W1_CASE(2, 4, true)
#undef BONSAI_W1_CASE
  return cudaErrorInvalidValue;
}

}  // namespace

extern "C" {

// Returns a cudaError_t (0 = launched). bf16 != 0: x, y, bias are bfloat16, else float16. mt: m16
// tiles per warp (1, 2, 4); nt: n8 tiles per warp (1, 4), so a block covers 32 nt output columns;
// wide: each lane takes whole groups (16-byte loads of bits; qs 16-byte aligned), units of four
// groups, else a quad of lanes shares each group; units_per_split counts those units.
int bonsai_w1a16(const void* x, const void* qs, const void* d, const void* bias, void* y, float* part,
                 int* counters, int M, int N, int K, int NG, int ldx, int ldy, int splits, int units_per_split,
                 int mt, int nt, int wide, int bf16, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (bf16)
    return launch_tiles<__nv_bfloat16>(mt, nt, wide != 0, x, qs, d, bias, y, part, counters, M, N, K, NG, ldx, ldy,
                                       splits, units_per_split, s);
  return launch_tiles<__half>(mt, nt, wide != 0, x, qs, d, bias, y, part, counters, M, N, K, NG, ldx, ldy, splits,
                              units_per_split, s);
}

const char* bonsai_cuda_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // extern "C"
