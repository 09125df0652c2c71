// Masked convolution as implicit GEMMs on tensor cores (see masked_conv.h for the math).
//
// Forward and dgrad are one kernel, `conv_kernel`: rows are pixels (M = N*H*W),
// columns output channels, and the reduction runs over the active taps only (their
// offsets in the kernel's parameter space: no mask is read, no masked-out tap loaded
// or multiplied) and, inside each tap, over the channels in steps of kBlockK. The tap
// count is a runtime loop bound, not a template parameter: unrolling it for each of
// the 11 tap counts the models use took the compile of this file past 10 minutes on
// 2 cores, and a step (a 64x64x32 tile product) dwarfs the loop's cost. Each step
// stages a tile of shifted activations (zero outside the image) and a tile of the
// tap's weight in shared memory and multiplies them with mma.sync, its fragments read
// with ldmatrix (TensorCoreMath). dgrad is the same GEMM
// on gout with negated offsets and the weight read transposed. The gated forward
// gives each CTA the matching column blocks of both halves (two accumulator sets) so
// the gate runs in the epilogue.
//
// The fusions of masked_conv.h are small pieces of these kernels: the residual is one
// more term in the epilogue (add_residual); dgrad of a concat_elu input is the
// two-halves GEMM of the gated forward over the weight read transposed, whose epilogue
// (combine_halves) takes concat_elu's backward instead of the gate, after the
// dropout's. The forward and wgrad of a concat_elu input read it materialised by the
// glue (one elementwise pass of gates.cu's concat_elu kernel, dropout included), not
// computed while loading x: there it was recomputed for every tap and block of output
// columns that loads the element (6 taps x 3 blocks = 18 times at PixelCNN++'s 2x3
// convolutions of 160 filters), and its expm1 and the dropout's byte gathers sat between
// a step's loads and their stores to shared memory, where nothing hides them.
//
// wgrad, `wgrad_kernel`, is one GEMM per tap (taps are the grid's y dimension):
// rows input channels, columns output channels, reduction over the pixels, split
// over grid z into fixed ranges whose partials `finish_weight_grad_kernel` adds in order,
// writing the gradient in the weight's own (Cout, Cin, kh, kw) layout and dtype. Its loop
// moves each loaded pixel on by carries (advance_pixel), dividing only once.
//
// Global offsets are 64-bit throughout (tensors may exceed 2^31 elements); shared
// memory offsets are 32-bit.
//
// Floor for the issue's shape, x (64, 128, 32, 32) -> 256 channels, 3x3 vertical mask
// (T = 6): each GEMM is 2 * 65536 * 256 * (6 * 128) = 25.8 GFLOP; at ~380 TFLOP/s TF32
// that is 68 us (34 us at ~760 TFLOP/s bf16); the forward moves x (33.5 MB fp32) and
// out (67 MB) ~ 25 us at 4 TB/s, so every pass is compute-bound: forward + dgrad +
// wgrad >= 204 us TF32, 102 us bf16. Measured on the H200 (2026-11-30, with WMMA:
// benchmarks/results/2026-11-30-h200.md): forward 0.686 ms TF32, 0.278 bf16, i.e. 10%
// and 12% of the floor, issue-bound: a 64x64x32 step's loop body held ~400 SASS
// instructions for 16 tensor-core ones per warp, its bf16 WMMA fragments read by 32-bit
// generic loads and transposed by MOVM, its TF32 products as twice as many m16n8k4
// HMMAs. The gains of the mma.sync + ldmatrix multiplier, the 128x128 tiles (WideTile)
// and the divisions gone from wgrad's loop are predicted, with their reasons, in
// benchmarks/masked_conv_perf_notes.md; a cp.async pipeline is the next step once those
// are measured.
#include <algorithm>
#include <cstring>
#include <type_traits>

#include "gates.h"
#include "masked_conv.h"

namespace pixelcnn_kernels {
namespace masked_conv {
namespace {

constexpr int kBlockK = 32;  // reduction step: channels of one tap (conv) or pixels (wgrad)

// A CTA's GEMM tile: kM rows (pixels for the conv, input channels for wgrad) by kN
// columns (per gate half), over kWarpsM x kWarpsN warps owning kWarpM x kWarpN each;
// its kernels' registers are bounded for kMinBlocksPerSm resident blocks per SM.
template <int kRows, int kCols, int kRowWarps, int kColWarps, int kMinBlocks>
struct Tile {
  static constexpr int kM = kRows;
  static constexpr int kN = kCols;
  static constexpr int kWarpsM = kRowWarps;
  static constexpr int kWarpsN = kColWarps;
  static constexpr int kThreads = 32 * kWarpsM * kWarpsN;
  static constexpr int kWarpM = kM / kWarpsM;
  static constexpr int kWarpN = kN / kWarpsN;
  static constexpr int kMinBlocksPerSm = kMinBlocks;
};
// Built with -DPIXELCNN_KERNELS_SMALL_TILES, every GEMM takes SmallTile, the tiles of before
// the 128-row ones (bc42858, 1dd44a3): the GPU check rebuilds so when the CUDA masked conv's
// tests fail, to tell a fault of the large tiles from one elsewhere.
#ifdef PIXELCNN_KERNELS_SMALL_TILES
constexpr bool kLargeTiles = false;
#else
constexpr bool kLargeTiles = true;
#endif
// The exact-fp32 GEMMs, and the tensor-core ones WideTile and TwoHalvesTile do not take.
using SmallTile = Tile<64, 64, 2, 2, 1>;
// One-accumulator forward, dgrad and wgrad on tensor cores over columns (and for wgrad
// rows) that 128-wide blocks pad no more than 64-wide ones (wide_blocks_fit). The
// loops are issue-bound (2026-11-30: ~400 SASS instructions a step, most of them the next
// step's gather, for 16 tensor-core ones per warp): here a thread gathers as many chunks
// a step as in SmallTile (the tile has 4x the elements over 2x the threads) for warps of
// 64 x 32, twice the mma.sync of SmallTile's 32 x 32. Two blocks per SM (16 warps) cover
// a step's load latency, at 128 registers: a few spilled values, reloaded from L1.
using WideTile = Tile<128, 128, 2, 4, 2>;
// The two-halves GEMMs (gated forward, dgrad of a concat_elu input) on tensor cores: 128
// pixels by 64 columns of each half at 8 warps of 32 x 32 per half, 2 blocks per SM. A
// thread gathers 4 chunks a step (bf16) where SmallTile's takes 6 for the same mma.sync.
using TwoHalvesTile = std::conditional_t<kLargeTiles, Tile<128, 64, 4, 2, 2>, SmallTile>;
// The epilogue stages the accumulators this many rows at a time: the whole fp32 tile of
// WideTile or TwoHalvesTile (128 x 132 floats, 66 KB) would not fit the 48 KB of static
// shared memory.
constexpr int kStageRows = 64;

constexpr int kChunkBytes = 16;  // global loads and shared stores move 16-byte chunks
// Shared tiles pad each row so that the fragment reads of a warp hit 32 distinct banks:
// 16 bytes for 16-bit tiles (ldmatrix reads 8 rows of 16 bytes per phase; rows 16 bytes
// apart modulo 128 fill the banks) and for 32-bit tiles whose rows run along the
// reduction (a TF32 fragment reads rows g = lane / 4 at columns t = lane % 4: rows 4
// banks apart); 32 bytes for 32-bit tiles whose rows run across it (it reads rows t at
// columns g: rows 8 banks apart). Rows stay 16-byte aligned for the chunked stores.
template <typename Elem, bool kRowsAlongReduction>
constexpr int kRowPad = (sizeof(Elem) == 4 && !kRowsAlongReduction ? 2 : 1) * kChunkBytes / sizeof(Elem);
constexpr int kStagePad = 4;  // floats; the fp32 staging tile of the epilogue

// ---------------------------------------------------------------------------------
// Tile addressing and loading

// How a shared tile holding a GEMM operand is stored: RowMajor keeps element (row, col)
// at row * ld + col, ColMajor at col * ld + row.
struct RowMajor {};
struct ColMajor {};

// Offset of element (row, col) of a shared tile stored in `Layout` with leading dimension kLd.
template <typename Layout, int kLd>
__device__ __forceinline__ int tile_offset(int row, int col) {
  return std::is_same<Layout, RowMajor>::value ? row * kLd + col : col * kLd + row;
}

template <int kBytes>
struct RawBits;
template <>
struct RawBits<2> {
  using type = unsigned short;
};
template <>
struct RawBits<4> {
  using type = unsigned int;
};

// Copies a kRows x kCols tile of Elem from global rows into a row-major shared tile
// (leading dimension kLd) in two steps, so the global loads of the next reduction
// step are in flight while the current one is multiplied: gather() loads this
// thread's 16-byte chunks into registers, commit() stores them to shared memory.
// Element bits are copied as they are; missing rows and columns become zeros.
template <typename Elem, int kRows, int kCols, int kLd, int kThreads>
struct TileLoader {
  using Bits = typename RawBits<sizeof(Elem)>::type;
  static constexpr int kVec = kChunkBytes / sizeof(Elem);
  static constexpr int kChunksPerRow = kCols / kVec;
  static constexpr int kRowStride = kThreads / kChunksPerRow;  // rows between one thread's chunks
  static constexpr int kChunks = kRows / kRowStride;           // chunks per thread
  static_assert(kCols % kVec == 0 && kThreads % kChunksPerRow == 0 && kRows % kRowStride == 0,
                "the tile must split evenly into 16-byte chunks over the CTA");
  static_assert((kLd * sizeof(Elem)) % kChunkBytes == 0, "shared rows must keep chunks 16-byte aligned");

  uint4 chunk[kChunks];

  // Tile row of this thread's i-th chunk, and the tile column its chunks start at.
  __device__ __forceinline__ static int row(int i) { return threadIdx.x / kChunksPerRow + i * kRowStride; }
  __device__ __forceinline__ static int col() { return (threadIdx.x % kChunksPerRow) * kVec; }

  // row_start(i) is the global address of tile column 0 in the row of chunk i, or
  // nullptr for a row of zeros; columns at or past cols_valid read as zero. vec_ok:
  // every row start is 16-byte aligned, so whole chunks load as one vector.
  template <typename RowStart>
  __device__ __forceinline__ void gather(RowStart row_start, int cols_valid, bool vec_ok) {
    const int c = col();
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      const Bits* src = reinterpret_cast<const Bits*>(row_start(i));
      uint4 v = make_uint4(0, 0, 0, 0);
      if (src != nullptr) {
        if (vec_ok && c + kVec <= cols_valid) {
          v = __ldg(reinterpret_cast<const uint4*>(src + c));
        } else {
          Bits bits[kVec];
#pragma unroll
          for (int e = 0; e < kVec; ++e) bits[e] = c + e < cols_valid ? __ldg(src + c + e) : Bits{0};
          memcpy(&v, bits, sizeof(v));
        }
      }
      chunk[i] = v;
    }
  }

  __device__ __forceinline__ void commit(Elem* tile) const {
#pragma unroll
    for (int i = 0; i < kChunks; ++i) *reinterpret_cast<uint4*>(tile + row(i) * kLd + col()) = chunk[i];
  }
};

// (n, y, x) of a pixel, decoded once; `inside` is false past the last pixel.
struct PixelCoords {
  int64_t image_start;  // pixel index of (n, 0, 0)
  int y;
  int x;
  bool inside;
};

__device__ __forceinline__ PixelCoords decode_pixel(int64_t pixel, int64_t pixels, int height, int width) {
  const int64_t hw = static_cast<int64_t>(height) * width;
  const int64_t image = pixel / hw;
  const int rem = static_cast<int>(pixel - image * hw);
  return {image * hw, rem / width, rem % width, pixel < pixels};
}

// px moved on to pixel index `pixel`, `rows` * width + `cols` pixels after it (cols < width;
// rows < height, taken modulo the image: the image follows from the index): a carry and one
// conditional subtraction per coordinate instead of decode_pixel's divisions.
__device__ __forceinline__ void advance_pixel(PixelCoords& px, int64_t pixel, int rows, int cols, int64_t pixels,
                                              int height, int width) {
  px.x += cols;
  const bool carry = px.x >= width;
  if (carry) px.x -= width;
  px.y += rows + carry;  // < 2 * height
  if (px.y >= height) px.y -= height;
  px.image_start = pixel - (static_cast<int64_t>(px.y) * width + px.x);
  px.inside = pixel < pixels;
}

// Address of channel `col0` of the pixel at `px` shifted by (dy, dx) in a channels-last
// tensor with `channels` channels, or nullptr when the shifted pixel is outside the image.
template <typename Elem>
__device__ __forceinline__ const Elem* shifted_row(const Elem* base, int channels, int col0, const PixelCoords& px,
                                                   int dy, int dx, int height, int width) {
  const int y = px.y + dy;
  const int x = px.x + dx;
  if (!px.inside || y < 0 || y >= height || x < 0 || x >= width) return nullptr;
  return base + (px.image_start + static_cast<int64_t>(y) * width + x) * channels + col0;
}

// ---------------------------------------------------------------------------------
// Tile multipliers over a Tile T: acc[h] += A (T::kM x kBlockK) * B_h (kBlockK x T::kN),
// from shared tiles, for kHalves column blocks of B side by side (B_h's column n is tile
// column h * T::kN + n). store(stage, row0) writes acc's rows [row0, row0 + kStageRows) to
// a row-major fp32 staging tile whose columns are laid out the same way.

// Warp-level tensor-core instructions (PTX ISA, "Warp-level matrix multiply-accumulate
// instructions"). In a fragment, lane l is thread t = l % 4 of group g = l / 4.

// Four 8x8 matrices of 16-bit elements from shared memory: lanes 8j .. 8j + 7 give the
// addresses of matrix j's rows (16 bytes each); lane l receives in r[j] the two elements
// of matrix j at row g, columns 2t and 2t + 1 (kTransposed: at rows 2t and 2t + 1 of
// column g, i.e. of the transposed matrix).
template <bool kTransposed>
__device__ __forceinline__ void load_matrices_x4(uint32_t (&r)[4], const void* row_address) {
#if PIXELCNN_CUDA_ON_CPU
  cuda_on_cpu::load_matrices_x4(r, row_address, kTransposed);
#else
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(row_address));
  if constexpr (kTransposed) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
  }
#endif
}

// d += a (16 x kK, row-major fragment) * b (kK x 8, column fragment) in fp32: m16n8k16 for
// 16-bit inputs (each register two elements), m16n8k8 for TF32 (each register one).
// a: regs (g, k), (g + 8, k), (g, k + kK/2), (g + 8, k + kK/2) for k the lane's first
// column(s) 2t (16-bit) or t (TF32); b: (k, g), (k + kK/2, g); d: (g, 2t), (g, 2t + 1),
// (g + 8, 2t), (g + 8, 2t + 1).
template <typename Elem>
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if PIXELCNN_CUDA_ON_CPU
  using cuda_on_cpu::MmaInput;
  cuda_on_cpu::mma(d, a, b,
                   std::is_same<Elem, __nv_bfloat16>::value ? MmaInput::kBFloat16
                   : std::is_same<Elem, __half>::value      ? MmaInput::kFloat16
                                                            : MmaInput::kTf32);
#else
  if constexpr (std::is_same<Elem, __nv_bfloat16>::value) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else if constexpr (std::is_same<Elem, __half>::value) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#endif
}

// A float32 value rounded to TF32 (to nearest, ties away), as cuBLAS rounds its inputs,
// rather than truncated by the tensor core.
__device__ __forceinline__ uint32_t to_tf32(float v) {
#if PIXELCNN_CUDA_ON_CPU
  return cuda_on_cpu::to_tf32_rna(v);
#else
  uint32_t bits;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(bits) : "f"(v));
  return bits;
#endif
}

// Tensor-core multiplier (mma.sync; TF32 for float32 inputs). Warp (wm, wn) of the
// T::kWarpsM x T::kWarpsN grid owns rows [wm * T::kWarpM, +T::kWarpM) and columns
// [wn * T::kWarpN, +T::kWarpN) of each half: kFragsM x kFragsN fragments of 16 x 8.
// 16-bit fragments are read with ldmatrix (one instruction per 16 x 16 of A, per 16 x 16
// of B: two fragments), transposing where the tile is stored across the fragment's
// order; TF32 fragments with 32-bit shared loads, one element each.
template <typename Elem, int kHalves, typename T>
struct TensorCoreMath {
  static constexpr bool kTf32 = std::is_same<Elem, float>::value;
  static constexpr int kK = kTf32 ? 8 : 16;  // reduction per mma
  static constexpr int kFragsM = T::kWarpM / 16;
  static constexpr int kFragsN = T::kWarpN / 8;
  static_assert(kFragsN % 2 == 0, "16-bit B fragments are read in pairs");

  float acc[kHalves][kFragsM][kFragsN][4] = {};

  __device__ __forceinline__ static int warp_row() { return threadIdx.x / 32 / T::kWarpsN * T::kWarpM; }
  __device__ __forceinline__ static int warp_col() { return threadIdx.x / 32 % T::kWarpsN * T::kWarpN; }
  __device__ __forceinline__ static int lane() { return threadIdx.x % 32; }

  // The A fragment of rows [m0, m0 + 16) and reduction columns [k0, k0 + kK).
  template <typename Layout, int kLd>
  __device__ __forceinline__ static void load_a(uint32_t (&a)[4], const Elem* tile, int m0, int k0) {
    if constexpr (kTf32) {
      const int g = lane() / 4, t = lane() % 4;
#pragma unroll
      for (int r = 0; r < 4; ++r) a[r] = to_tf32(tile[tile_offset<Layout, kLd>(m0 + g + (r % 2) * 8, k0 + t + (r / 2) * 4)]);
    } else {
      // Matrix j = lane / 8 is (rows + 8 (j % 2), columns + 8 (j / 2)); its lane supplies row r = lane % 8
      // of the stored tile: a fragment row (row-major) or a reduction column (column-major, transposed).
      constexpr bool kRowMajor = std::is_same<Layout, RowMajor>::value;
      const int j = lane() / 8, r = lane() % 8;
      const int m = m0 + (j % 2) * 8 + (kRowMajor ? r : 0);
      const int k = k0 + (j / 2) * 8 + (kRowMajor ? 0 : r);
      load_matrices_x4<!kRowMajor>(a, tile + tile_offset<Layout, kLd>(m, k));
    }
  }

  // The B fragments of reduction rows [k0, k0 + kK) and columns [n0, n0 + 8) (b[0]) and, for
  // 16-bit inputs, [n0 + 8, n0 + 16) (b[1]).
  template <typename Layout, int kLd>
  __device__ __forceinline__ static void load_b(uint32_t (&b)[2][2], const Elem* tile, int k0, int n0) {
    if constexpr (kTf32) {
      const int g = lane() / 4, t = lane() % 4;
#pragma unroll
      for (int r = 0; r < 2; ++r) b[0][r] = to_tf32(tile[tile_offset<Layout, kLd>(k0 + t + r * 4, n0 + g)]);
    } else {
      // Matrix j = lane / 8 is (reduction rows + 8 (j % 2), columns + 8 (j / 2)); its lane supplies
      // row r = lane % 8 of the stored tile: a reduction row (row-major, transposed) or a column.
      constexpr bool kRowMajor = std::is_same<Layout, RowMajor>::value;
      const int j = lane() / 8, r = lane() % 8;
      const int k = k0 + (j % 2) * 8 + (kRowMajor ? r : 0);
      const int n = n0 + (j / 2) * 8 + (kRowMajor ? 0 : r);
      uint32_t regs[4];
      load_matrices_x4<kRowMajor>(regs, tile + tile_offset<Layout, kLd>(k, n));
      b[0][0] = regs[0];
      b[0][1] = regs[1];
      b[1][0] = regs[2];
      b[1][1] = regs[3];
    }
  }

  template <typename ALayout, int kLdA, typename BLayout, int kLdB>
  __device__ __forceinline__ void multiply(const Elem* a_tile, const Elem* b_tile) {
    constexpr int kPairs = kTf32 ? 1 : 2;  // B fragments per load
#pragma unroll
    for (int kk = 0; kk < kBlockK; kk += kK) {
      uint32_t a[kFragsM][4];
#pragma unroll
      for (int i = 0; i < kFragsM; ++i) load_a<ALayout, kLdA>(a[i], a_tile, warp_row() + i * 16, kk);
#pragma unroll
      for (int h = 0; h < kHalves; ++h) {
#pragma unroll
        for (int j = 0; j < kFragsN; j += kPairs) {
          uint32_t b[2][2];
          load_b<BLayout, kLdB>(b, b_tile, kk, h * T::kN + warp_col() + j * 8);
#pragma unroll
          for (int pair = 0; pair < kPairs; ++pair)
#pragma unroll
            for (int i = 0; i < kFragsM; ++i) mma<Elem>(acc[h][i][j + pair], a[i], b[pair]);
        }
      }
    }
  }

  template <int kLdStage>
  __device__ __forceinline__ void store(float* stage, int row0) const {
    const int g = lane() / 4, t = lane() % 4;
#pragma unroll
    for (int i = 0; i < kFragsM; ++i) {
      const int frag_row = warp_row() + i * 16 - row0;  // a fragment's 16 rows lie in one staged block
      if (frag_row < 0 || frag_row >= kStageRows) continue;
#pragma unroll
      for (int h = 0; h < kHalves; ++h)
#pragma unroll
        for (int j = 0; j < kFragsN; ++j) {
          const int col = h * T::kN + warp_col() + j * 8 + 2 * t;
#pragma unroll
          for (int r = 0; r < 4; ++r) stage[(frag_row + g + (r / 2) * 8) * kLdStage + col + r % 2] = acc[h][i][j][r];
        }
    }
  }
};

// Exact float32 (FFMA) multiplier for float32 inputs when TF32 is not allowed. Thread
// (tm, tn) owns rows tm + i * kThreadsM and columns tn + j * kThreadsN of each half, so
// a warp reads consecutive B columns (no bank conflicts) and broadcasts A.
template <int kHalves, typename T>
struct ExactFloatMath {
  static constexpr int kThreadsN = 16;
  static constexpr int kThreadsM = T::kThreads / kThreadsN;
  static constexpr int kRows = T::kM / kThreadsM;
  static constexpr int kCols = T::kN / kThreadsN;

  float acc[kHalves][kRows][kCols] = {};

  __device__ __forceinline__ static int thread_row() { return threadIdx.x / kThreadsN; }
  __device__ __forceinline__ static int thread_col() { return threadIdx.x % kThreadsN; }

  template <typename ALayout, int kLdA, typename BLayout, int kLdB>
  __device__ __forceinline__ void multiply(const float* a_tile, const float* b_tile) {
#pragma unroll 4
    for (int k = 0; k < kBlockK; ++k) {
      float a[kRows];
#pragma unroll
      for (int i = 0; i < kRows; ++i) a[i] = a_tile[tile_offset<ALayout, kLdA>(thread_row() + i * kThreadsM, k)];
#pragma unroll
      for (int h = 0; h < kHalves; ++h)
#pragma unroll
        for (int j = 0; j < kCols; ++j) {
          const float b = b_tile[tile_offset<BLayout, kLdB>(k, h * T::kN + thread_col() + j * kThreadsN)];
#pragma unroll
          for (int i = 0; i < kRows; ++i) acc[h][i][j] = fmaf(a[i], b, acc[h][i][j]);
        }
    }
  }

  template <int kLdStage>
  __device__ __forceinline__ void store(float* stage, int row0) const {
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const int row = thread_row() + i * kThreadsM - row0;
      if (row < 0 || row >= kStageRows) continue;
#pragma unroll
      for (int h = 0; h < kHalves; ++h)
#pragma unroll
        for (int j = 0; j < kCols; ++j) stage[row * kLdStage + h * T::kN + thread_col() + j * kThreadsN] = acc[h][i][j];
    }
  }
};

// The epilogue's walk over a CTA's T::kM x T::kN accumulators, kStageRows rows at a time:
// `math` writes a block of rows to the fp32 staging tile `stage` (which aliases the input
// tiles, hence the barriers), then element(row, col, sums) runs for each (row, col) of the
// block, spread over the CTA's threads, `sums` pointing at its staged sum (the first half's:
// half h's is h * T::kN floats on).
template <typename T, int kLdStage, typename Math, typename Element>
__device__ __forceinline__ void for_each_staged(const Math& math, float* stage, Element element) {
#pragma unroll 1
  for (int row0 = 0; row0 < T::kM; row0 += kStageRows) {
    __syncthreads();  // the multiply, or the previous block's elements, are done with the shared memory
    math.template store<kLdStage>(stage, row0);
    __syncthreads();
    for (int idx = threadIdx.x; idx < kStageRows * T::kN; idx += T::kThreads) {
      const int r = idx / T::kN;
      const int c = idx % T::kN;
      element(row0 + r, c, stage + r * kLdStage + c);
    }
  }
}

// The tensor-core paths need sm_80 (bf16 and TF32 mma.sync); the glue refuses older GPUs.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define PIXELCNN_MASKED_CONV_ARCH_OK 1
#else
#define PIXELCNN_MASKED_CONV_ARCH_OK 0
#endif

// ---------------------------------------------------------------------------------
// Forward / dgrad / gated forward

struct ConvParams {
  const void* src;           // (N, H, W, k_channels) channels-last
  const void* weight;        // (taps, Cin, Cout): B_t[k][n] is weight[t][k][n], or weight[t][n][k] transposed
  const float* bias;         // (n_channels) or null
  const float* cond;         // (N, n_channels) or null
  const void* residual;      // (N, H, W, n_channels / halves) or null: added to out
  const void* addend;        // (N, H, W, n_channels) or null; gated only: added before the gate
  const void* concat_elu_x;  // two halves, dgrad: the forward's x (N, H, W, n_channels / 2); else null
  // dgrad with concat_elu_x: the forward's dropout mask after concat_elu (N, H, W, n_channels),
  // applied to the halves' gradients, or null.
  const uint8_t* keep;
  float keep_scale;
  void* out;                 // (N, H, W, n_channels / halves)
  void* preact;              // (N, H, W, n_channels) or null; gated only: conv + bias + addend
  int64_t pixels;
  int height;
  int width;
  int k_channels;  // reduced channels per tap
  int n_channels;  // GEMM columns, both halves included
  Gate gate;
  // Two halves: the channels are gate_groups blocks of two halves [a_1 b_1 | a_2 b_2 | ...]
  // (one block: [a | b]) while the weight's columns come halves first; see channel_of.
  int gate_groups;
  int taps;
  bool src_vec_ok;
  bool weight_vec_ok;
  int dy[kMaxTaps];
  int dx[kMaxTaps];
};

// expf/tanhf, not the fast approximations: the gate matches torch.tanh(a) * torch.sigmoid(b)
// to float32 rounding.
__device__ __forceinline__ float apply_gate(Gate gate, float a, float b) {
  const float sigmoid_b = 1.0f / (1.0f + expf(-b));
  return (gate == Gate::kTanhSigmoid ? tanhf(a) : a) * sigmoid_b;
}

// The result of a two-halves GEMM at output element `index` from its halves: the gate
// or, in dgrad of a concat_elu input, the gradient w.r.t. x from those w.r.t. elu(x)
// and elu(-x) (x has out's shape).
template <typename Elem>
__device__ __forceinline__ float combine_halves(const ConvParams& p, int64_t index, float first, float second) {
  if (p.concat_elu_x != nullptr)
    return concat_elu_grad_math(to_float(static_cast<const Elem*>(p.concat_elu_x)[index]), first, second);
  return apply_gate(p.gate, first, second);
}

// The channel of a two-halves GEMM's column `col` (of n_channels / 2) in half `h`: the
// GEMM pairs column col with col + half, the channels come in p.gate_groups blocks
// [a_1 b_1 | a_2 b_2 | ...], block g twice output group g: ceil(half / gate_groups)
// channels per group, the last one the rest (masks.color_group_size). One block (a
// warp-uniform branch, no integer division per element): h * half + col.
__device__ __forceinline__ int channel_of(const ConvParams& p, int col, int h) {
  const int half = p.n_channels / 2;
  if (p.gate_groups == 1) return h * half + col;
  int a, b;
  colour_group_halves(col, half, (half + p.gate_groups - 1) / p.gate_groups, a, b);
  return h == 0 ? a : b;
}

// `value` plus the residual at output element `index`, when there is one.
template <typename Elem>
__device__ __forceinline__ float add_residual(const ConvParams& p, int64_t index, float value) {
  return p.residual == nullptr ? value : value + to_float(static_cast<const Elem*>(p.residual)[index]);
}

// out = epilogue(src (*) weight) over Tile T. kHalves == 2: gated forward, or dgrad of a
// concat_elu input; kWeightTransposed: dgrad.
// Grid: (ceil(pixels / T::kM), ceil(n_channels / kHalves / T::kN)), T::kThreads threads.
template <typename Elem, typename Math, int kHalves, bool kWeightTransposed, typename T>
__global__ void __launch_bounds__(T::kThreads, T::kMinBlocksPerSm) conv_kernel(const ConvParams p) {
#if PIXELCNN_MASKED_CONV_ARCH_OK
  using BLayout = std::conditional_t<kWeightTransposed, ColMajor, RowMajor>;
  constexpr int kColsB = kHalves * T::kN;
  constexpr int kLdA = kBlockK + kRowPad<Elem, true>;
  constexpr int kLdB = kWeightTransposed ? kBlockK + kRowPad<Elem, true> : kColsB + kRowPad<Elem, false>;
  constexpr int kLdStage = kColsB + kStagePad;
  // A is T::kM x kBlockK row-major; each half of B is kBlockK x T::kN, stored as k rows
  // (plain) or n rows (transposed: the weight is contiguous along k).
  using LoaderA = TileLoader<Elem, T::kM, kBlockK, kLdA, T::kThreads>;
  using LoaderB = std::conditional_t<kWeightTransposed, TileLoader<Elem, T::kN, kBlockK, kLdB, T::kThreads>,
                                     TileLoader<Elem, kBlockK, T::kN, kLdB, T::kThreads>>;
  constexpr int kRowsB = kWeightTransposed ? kColsB : kBlockK;
  constexpr int kTileBytes = (T::kM * kLdA + kRowsB * kLdB) * static_cast<int>(sizeof(Elem));
  constexpr int kStageBytes = kStageRows * kLdStage * static_cast<int>(sizeof(float));
  __shared__ __align__(128) unsigned char smem[kTileBytes > kStageBytes ? kTileBytes : kStageBytes];
  Elem* a_tile = reinterpret_cast<Elem*>(smem);
  Elem* b_tile = a_tile + T::kM * kLdA;

  const Elem* src = static_cast<const Elem*>(p.src);
  const Elem* weight = static_cast<const Elem*>(p.weight);
  const int half = p.n_channels / kHalves;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * T::kM;
  const int n0 = blockIdx.y * T::kN;

  // The pixels of this thread's A rows are the same for every tap and channel step.
  PixelCoords pixel_rows[LoaderA::kChunks];
#pragma unroll
  for (int i = 0; i < LoaderA::kChunks; ++i) pixel_rows[i] = decode_pixel(m0 + LoaderA::row(i), p.pixels, p.height, p.width);

  const int k_channels = p.k_channels;
  LoaderA a_loader;
  LoaderB b_loaders[kHalves];
  // Loads the tiles of reduction step (tap, k0) into registers.
  auto gather = [&](int tap, int k0) {
    const int dy = p.dy[tap];
    const int dx = p.dx[tap];
    a_loader.gather(
        [&](int i) { return shifted_row(src, k_channels, k0, pixel_rows[i], dy, dx, p.height, p.width); },
        k_channels - k0, p.src_vec_ok);
    const Elem* tap_weight = weight + static_cast<int64_t>(tap) * p.k_channels * p.n_channels;
#pragma unroll
    for (int h = 0; h < kHalves; ++h) {
      const int col0 = h * half + n0;  // first weight column (n) of this half's block
      if constexpr (kWeightTransposed) {
        b_loaders[h].gather(
            [&](int i) {
              const int r = LoaderB::row(i);
              return n0 + r < half ? tap_weight + static_cast<int64_t>(col0 + r) * k_channels + k0 : nullptr;
            },
            k_channels - k0, p.weight_vec_ok);
      } else {
        b_loaders[h].gather(
            [&](int i) {
              const int k = k0 + LoaderB::row(i);
              return k < k_channels ? tap_weight + static_cast<int64_t>(k) * p.n_channels + col0 : nullptr;
            },
            half - n0, p.weight_vec_ok);
      }
    }
  };

  // The reduction: every active tap, and within it the channels in kBlockK steps.
  // The tiles of the next step are gathered while the current step is multiplied.
  Math math;
  const int steps = p.taps * ((k_channels + kBlockK - 1) / kBlockK);
  int tap = 0;
  int k0 = 0;
  gather(tap, k0);
  for (int step = 0; step < steps; ++step) {
    __syncthreads();  // the previous step's multiply is done with the tiles
    a_loader.commit(a_tile);
#pragma unroll
    for (int h = 0; h < kHalves; ++h) b_loaders[h].commit(b_tile + tile_offset<BLayout, kLdB>(0, h * T::kN));
    __syncthreads();
    if (step + 1 < steps) {
      k0 += kBlockK;
      if (k0 >= k_channels) {
        k0 = 0;
        ++tap;
      }
      gather(tap, k0);
    }
    math.template multiply<RowMajor, kLdA, BLayout, kLdB>(a_tile, b_tile);
  }

  // Epilogue: staged sums -> bias, addend, (preact stored) cond, gate (or concat_elu's
  // backward), residual -> guarded, coalesced stores.
  Elem* out = static_cast<Elem*>(p.out);
  Elem* preact = static_cast<Elem*>(p.preact);
  const Elem* addend = static_cast<const Elem*>(p.addend);
  const int64_t hw = static_cast<int64_t>(p.height) * p.width;
  for_each_staged<T, kLdStage>(math, reinterpret_cast<float*>(smem), [&](int r, int c, const float* sums) {
    const int64_t pixel = m0 + r;
    const int col = n0 + c;
    if (pixel >= p.pixels || col >= half) return;
    float pre[kHalves];
#pragma unroll
    for (int h = 0; h < kHalves; ++h) {
      const int channel = kHalves == 1 ? col : channel_of(p, col, h);
      pre[h] = sums[h * T::kN];
      // dgrad of a dropped-out concat_elu input: the gradient w.r.t. concat_elu's output, through the dropout.
      if (p.concat_elu_x != nullptr && p.keep != nullptr)
        pre[h] *= p.keep[pixel * p.n_channels + channel] != 0 ? p.keep_scale : 0.0f;
      if (p.bias != nullptr) pre[h] += p.bias[channel];
      if (addend != nullptr) pre[h] += to_float(addend[pixel * p.n_channels + channel]);
    }
    const int64_t index = pixel * half + col;
    float value = pre[0];
    if constexpr (kHalves == 2) {
#pragma unroll
      for (int h = 0; h < kHalves; ++h) {
        const int channel = channel_of(p, col, h);
        // A gate sees the pre-activation rounded to Elem, as stored for the backward and as a
        // separate gate op would read it (concat_elu's backward takes the fp32 sums, as Triton's).
        if (p.concat_elu_x == nullptr) pre[h] = round_to<Elem>(pre[h]);
        if (preact != nullptr) preact[pixel * p.n_channels + channel] = from_float<Elem>(pre[h]);
        if (p.cond != nullptr) pre[h] += p.cond[pixel / hw * p.n_channels + channel];
      }
      value = combine_halves<Elem>(p, index, pre[0], pre[1]);
    }
    out[index] = from_float<Elem>(add_residual<Elem>(p, index, value));
  });
#else
  __trap();
#endif
}

// ---------------------------------------------------------------------------------
// Weight gradient

struct WgradParams {
  const void* x;     // (N, H, W, in_channels)
  const void* gout;  // (N, H, W, Cout)
  float* dst;        // the partial sums (splits, T, Cin, Cout)
  int64_t pixels;
  int64_t pixels_per_split;
  int height;
  int width;
  int in_channels;
  int out_channels;
  int taps;
  bool x_vec_ok;
  bool gout_vec_ok;
  int dy[kMaxTaps];
  int dx[kMaxTaps];
};

// dst[split][t][ci][co] = sum over the split's pixels m of x[shift_t(m), ci] * gout[m, co].
// Grid: (ci blocks * co blocks, taps, splits). The pixel tile is the reduction (k) axis:
// the x tile is stored pixels x ci, i.e. A = x^T in column-major order.
template <typename Elem, typename Math, typename T>
__global__ void __launch_bounds__(T::kThreads, T::kMinBlocksPerSm) wgrad_kernel(const WgradParams p) {
#if PIXELCNN_MASKED_CONV_ARCH_OK
  constexpr int kLd = T::kM + kRowPad<Elem, false>;
  static_assert(T::kM == T::kN, "x and gout tiles share one loader shape and pixel decode");
  constexpr int kLdStage = T::kN + kStagePad;
  using Loader = TileLoader<Elem, kBlockK, T::kM, kLd, T::kThreads>;
  constexpr int kTileBytes = 2 * kBlockK * kLd * static_cast<int>(sizeof(Elem));
  constexpr int kStageBytes = kStageRows * kLdStage * static_cast<int>(sizeof(float));
  __shared__ __align__(128) unsigned char smem[kTileBytes > kStageBytes ? kTileBytes : kStageBytes];
  Elem* x_tile = reinterpret_cast<Elem*>(smem);
  Elem* g_tile = x_tile + kBlockK * kLd;

  const Elem* x = static_cast<const Elem*>(p.x);
  const Elem* gout = static_cast<const Elem*>(p.gout);
  const int ci_blocks = (p.in_channels + T::kM - 1) / T::kM;
  const int m0 = blockIdx.x % ci_blocks * T::kM;  // first input channel
  const int n0 = blockIdx.x / ci_blocks * T::kN;  // first output channel
  const int tap = blockIdx.y;
  const int dy = p.dy[tap];
  const int dx = p.dx[tap];
  const int64_t begin = blockIdx.z * p.pixels_per_split;
  const int64_t end = begin + p.pixels_per_split < p.pixels ? begin + p.pixels_per_split : p.pixels;

  Loader x_loader;
  Loader g_loader;
  // The pixel of each of this thread's chunks, decoded once and then moved kBlockK pixels
  // on per step (advance_pixel): no division in the loop.
  const int step_rows = kBlockK / p.width % p.height;
  const int step_cols = kBlockK % p.width;
  PixelCoords rows[Loader::kChunks];
#pragma unroll
  for (int i = 0; i < Loader::kChunks; ++i) rows[i] = decode_pixel(begin + Loader::row(i), end, p.height, p.width);
  auto gather = [&]() {
    x_loader.gather([&](int i) { return shifted_row(x, p.in_channels, m0, rows[i], dy, dx, p.height, p.width); },
                    p.in_channels - m0, p.x_vec_ok);
    g_loader.gather([&](int i) { return shifted_row(gout, p.out_channels, n0, rows[i], 0, 0, p.height, p.width); },
                    p.out_channels - n0, p.gout_vec_ok);
  };

  Math math;
  gather();
  for (int64_t p0 = begin; p0 < end; p0 += kBlockK) {
    __syncthreads();  // the previous step's multiply is done with the tiles
    x_loader.commit(x_tile);
    g_loader.commit(g_tile);
    __syncthreads();
    if (p0 + kBlockK < end) {
#pragma unroll
      for (int i = 0; i < Loader::kChunks; ++i)
        advance_pixel(rows[i], p0 + kBlockK + Loader::row(i), step_rows, step_cols, end, p.height, p.width);
      gather();
    }
    math.template multiply<ColMajor, kLd, RowMajor, kLd>(x_tile, g_tile);
  }

  const int64_t gwp_size = static_cast<int64_t>(p.taps) * p.in_channels * p.out_channels;
  float* dst = p.dst + blockIdx.z * gwp_size + static_cast<int64_t>(tap) * p.in_channels * p.out_channels;
  for_each_staged<T, kLdStage>(math, reinterpret_cast<float*>(smem), [&](int r, int c, const float* sums) {
    const int ci = m0 + r;
    const int co = n0 + c;
    if (ci < p.in_channels && co < p.out_channels) dst[static_cast<int64_t>(ci) * p.out_channels + co] = *sums;
  });
#else
  __trap();
#endif
}

struct WgradFinishParams {
  const float* partials;  // (splits, T, Cin, Cout)
  const uint8_t* hidden;  // (Cout, Cin), nonzero: a pair hidden at the anchor tap; or null
  void* grad;             // (Cout, Cin, positions) in Elem
  int splits;
  int taps;
  int in_channels;
  int out_channels;
  int positions;
  int anchor_tap;
  int tap_position[kMaxTaps];
};

// grad[co][ci][tap_position[t]] = sum over s = 0 .. splits-1, in that order, of partials[s][t][ci][co]
// (0 for the hidden pairs at the anchor tap). One thread a (t, ci, co) of partials' order: the reads
// coalesce, the writes (a small tensor) need not. The kernel's other positions are zeroed before.
template <typename Elem>
__global__ void finish_weight_grad_kernel(const WgradFinishParams p) {
  const int64_t pairs = static_cast<int64_t>(p.in_channels) * p.out_channels;
  const int64_t size = pairs * p.taps;
  Elem* grad = static_cast<Elem*>(p.grad);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < size;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int t = static_cast<int>(i / pairs);
    const int64_t ci = i % pairs / p.out_channels;
    const int64_t co = i % p.out_channels;
    float total = 0.0f;
#pragma unroll 4  // independent loads in flight, not one split's latency after another's
    for (int s = 0; s < p.splits; ++s) total += p.partials[s * size + i];
    if (p.hidden != nullptr && t == p.anchor_tap && p.hidden[co * p.in_channels + ci] != 0) total = 0.0f;
    grad[(co * p.in_channels + ci) * p.positions + p.tap_position[t]] = from_float<Elem>(total);
  }
}

// ---------------------------------------------------------------------------------
// Host side

bool chunk_aligned(const void* ptr, int64_t row_elements, int elem_bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % kChunkBytes == 0 && (row_elements * elem_bytes) % kChunkBytes == 0;
}

int elem_bytes(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

bool on_tensor_cores(DType dtype, bool allow_tf32) { return dtype != DType::kFloat32 || allow_tf32; }

// Whether WideTile's 128-wide blocks pad `extent` no more than SmallTile's 64-wide ones do
// (a multiple of 128, or 64 past one: Gated PixelCNN's 126 channels, say).
bool wide_blocks_fit(int64_t extent) {
  return kLargeTiles && ceil_div(extent, WideTile::kN) * WideTile::kN == ceil_div(extent, SmallTile::kN) * SmallTile::kN;
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls fn(Elem{}, TypeTag<Math>{}) with the element type of `dtype` and its tensor-core
// multiplier over tile T.
template <int kHalves, typename T, typename Fn>
void dispatch_tensor_core_math(DType dtype, Fn&& fn) {
  dispatch_dtype(dtype, [&](auto tag) {
    using Elem = decltype(tag);
    fn(Elem{}, TypeTag<TensorCoreMath<Elem, kHalves, T>>{});
  });
}

// The same with the exact fp32 multiplier for float32 when TF32 is not allowed.
template <int kHalves, typename T, typename Fn>
void dispatch_math(DType dtype, bool allow_tf32, Fn&& fn) {
  if (!on_tensor_cores(dtype, allow_tf32)) {
    fn(float{}, TypeTag<ExactFloatMath<kHalves, T>>{});
    return;
  }
  dispatch_tensor_core_math<kHalves, T>(dtype, fn);
}

// The ConvParams of a GEMM of `src` (k_channels per tap) against `weight` into `out`: no
// bias, addend, cond, residual or preact.
ConvParams conv_params(const void* src, int k_channels, const void* weight, int n_channels, void* out) {
  ConvParams params{};
  params.src = src;
  params.k_channels = k_channels;
  params.weight = weight;
  params.n_channels = n_channels;
  params.gate_groups = 1;
  params.out = out;
  return params;
}

// One conv_kernel GEMM of `params` (tensors, channel counts and epilogue set); fills in
// the problem's sizes and taps (offsets negated for dgrad) and the vector-load flags.
// The caller has checked 1 <= taps <= kMaxTaps.
template <int kHalves, bool kWeightTransposed>
void launch_conv(DType dtype, bool allow_tf32, const ConvProblem& problem, ConvParams params, cudaStream_t stream) {
  params.pixels = problem.batch * problem.height * problem.width;
  const int half = params.n_channels / kHalves;
  if (params.pixels == 0 || half == 0) return;
  params.height = problem.height;
  params.width = problem.width;
  params.taps = problem.taps;
  const int bytes = elem_bytes(dtype);
  params.src_vec_ok = chunk_aligned(params.src, params.k_channels, bytes);
  // plain: rows of n_channels, each half starting `half` in; transposed: rows of k_channels.
  params.weight_vec_ok = kWeightTransposed ? chunk_aligned(params.weight, params.k_channels, bytes)
                                           : chunk_aligned(params.weight, params.n_channels, bytes) &&
                                                 chunk_aligned(params.weight, half, bytes);
  const int offset_sign = kWeightTransposed ? -1 : 1;
  for (int t = 0; t < problem.taps; ++t) {
    params.dy[t] = offset_sign * problem.offsets[2 * t];
    params.dx[t] = offset_sign * problem.offsets[2 * t + 1];
  }
  auto launch = [&](auto tile_tag) {
    using T = typename decltype(tile_tag)::type;
    return [&](auto elem_tag, auto math_tag) {
      const dim3 grid(static_cast<unsigned>(ceil_div(params.pixels, T::kM)), static_cast<unsigned>(ceil_div(half, T::kN)));
      conv_kernel<decltype(elem_tag), typename decltype(math_tag)::type, kHalves, kWeightTransposed, T>
          <<<grid, T::kThreads, 0, stream>>>(params);
    };
  };
  const auto launch_small = launch(TypeTag<SmallTile>{});
  if (!on_tensor_cores(dtype, allow_tf32)) {
    launch_small(float{}, TypeTag<ExactFloatMath<kHalves, SmallTile>>{});
  } else if constexpr (kHalves == 2) {
    dispatch_tensor_core_math<2, TwoHalvesTile>(dtype, launch(TypeTag<TwoHalvesTile>{}));
  } else if (wide_blocks_fit(half)) {
    dispatch_tensor_core_math<1, WideTile>(dtype, launch(TypeTag<WideTile>{}));
  } else {
    dispatch_tensor_core_math<1, SmallTile>(dtype, launch_small);
  }
}

}  // namespace

void masked_conv2d_fwd(DType dtype, bool allow_tf32, const ConvProblem& problem, const void* x, const void* wp,
                       const float* bias, const void* residual, void* out, cudaStream_t stream) {
  ConvParams params = conv_params(x, problem.in_channels, wp, problem.out_channels, out);
  params.bias = bias;
  params.residual = residual;
  launch_conv<1, false>(dtype, allow_tf32, problem, params, stream);
}

void masked_conv2d_fwd_gated(DType dtype, bool allow_tf32, const ConvProblem& problem, const void* x, const void* wp,
                             const float* bias, const void* addend, const float* cond, const void* residual, Gate gate,
                             int gate_groups, void* out, void* preact, cudaStream_t stream) {
  ConvParams params = conv_params(x, problem.in_channels, wp, problem.out_channels, out);
  params.bias = bias;
  params.addend = addend;
  params.cond = cond;
  params.residual = residual;
  params.gate = gate;
  params.gate_groups = gate_groups;
  params.preact = preact;
  launch_conv<2, false>(dtype, allow_tf32, problem, params, stream);
}

void masked_conv2d_dgrad(DType dtype, bool allow_tf32, const ConvProblem& problem, const void* gout, const void* wp,
                         const void* x, const uint8_t* keep, float keep_scale, void* gx, cudaStream_t stream) {
  ConvParams params = conv_params(gout, problem.out_channels, wp, problem.in_channels, gx);
  if (x == nullptr) {
    launch_conv<1, true>(dtype, allow_tf32, problem, params, stream);
    return;
  }
  // The columns are concat_elu's 2C channels: halves elu(x) and elu(-x), folded into x's gradient
  // (through the forward's dropout first, when it had one).
  params.concat_elu_x = x;
  params.keep = keep;
  params.keep_scale = keep_scale;
  launch_conv<2, true>(dtype, allow_tf32, problem, params, stream);
}

WgradPlan plan_masked_conv2d_wgrad(DType dtype, bool allow_tf32, const ConvProblem& problem, int sm_count) {
  // WideTile where both channel counts fit it (see WideTile), on tensor cores.
  const bool wide = on_tensor_cores(dtype, allow_tf32) && wide_blocks_fit(problem.in_channels) &&
                    wide_blocks_fit(problem.out_channels);
  // One wave of CTAs (SmallTile's kernels fit 4 per SM, WideTile's 2), but at least
  // kMinPixelsPerSplit pixels per split so the partials stay a small fraction of the traffic.
  const int ctas_per_sm = wide ? WideTile::kMinBlocksPerSm : 4;
  const int block = wide ? WideTile::kM : SmallTile::kM;
  constexpr int64_t kMinPixelsPerSplit = 512;
  const int64_t pixels = problem.batch * problem.height * problem.width;
  const int64_t tiles = ceil_div(problem.in_channels, block) * ceil_div(problem.out_channels, block) * problem.taps;
  int64_t splits = std::min(ceil_div(static_cast<int64_t>(ctas_per_sm) * sm_count, std::max<int64_t>(tiles, 1)),
                            ceil_div(pixels, kMinPixelsPerSplit));
  splits = std::max<int64_t>(splits, 1);
  // Whole kBlockK steps per split; recount so that no split is empty.
  const int64_t pixels_per_split = std::max<int64_t>(ceil_div(ceil_div(pixels, splits), kBlockK) * kBlockK, kBlockK);
  splits = std::max<int64_t>(ceil_div(pixels, pixels_per_split), 1);
  const int64_t gwp_size = static_cast<int64_t>(problem.taps) * problem.in_channels * problem.out_channels;
  return {static_cast<int>(splits), pixels_per_split, splits * gwp_size, wide};
}

void masked_conv2d_wgrad(DType dtype, bool allow_tf32, const ConvProblem& problem, const WgradPlan& plan,
                         const WeightGradLayout& layout, const void* x, const void* gout, void* grad, float* workspace,
                         cudaStream_t stream) {
  const int64_t pairs = static_cast<int64_t>(problem.in_channels) * problem.out_channels;
  const int64_t pixels = problem.batch * problem.height * problem.width;
  if (pairs == 0) return;
  if (pixels == 0) {  // an empty sum (and no image to decode pixels in)
    cudaMemsetAsync(grad, 0, pairs * layout.positions * elem_bytes(dtype), stream);
    return;
  }
  const int bytes = elem_bytes(dtype);
  WgradParams params{x,
                     gout,
                     workspace,
                     pixels,
                     plan.pixels_per_split,
                     problem.height,
                     problem.width,
                     problem.in_channels,
                     problem.out_channels,
                     problem.taps,
                     chunk_aligned(x, problem.in_channels, bytes),
                     chunk_aligned(gout, problem.out_channels, bytes)};
  for (int t = 0; t < problem.taps; ++t) {
    params.dy[t] = problem.offsets[2 * t];
    params.dx[t] = problem.offsets[2 * t + 1];
  }
  auto launch = [&](auto tile_tag) {
    using T = typename decltype(tile_tag)::type;
    return [&](auto elem_tag, auto math_tag) {
      const dim3 grid(static_cast<unsigned>(ceil_div(problem.in_channels, T::kM) * ceil_div(problem.out_channels, T::kN)),
                      static_cast<unsigned>(problem.taps), static_cast<unsigned>(plan.splits));
      wgrad_kernel<decltype(elem_tag), typename decltype(math_tag)::type, T><<<grid, T::kThreads, 0, stream>>>(params);
    };
  };
  if (plan.wide_tiles)
    dispatch_tensor_core_math<1, WideTile>(dtype, launch(TypeTag<WideTile>{}));
  else
    dispatch_math<1, SmallTile>(dtype, allow_tf32, launch(TypeTag<SmallTile>{}));

  if (layout.positions > problem.taps)  // the masked-out positions: zero
    cudaMemsetAsync(grad, 0, pairs * layout.positions * bytes, stream);
  WgradFinishParams finish{workspace,          layout.hidden,        grad,
                           plan.splits,        problem.taps,         problem.in_channels,
                           problem.out_channels, layout.positions,   layout.anchor_tap};
  for (int t = 0; t < problem.taps; ++t) finish.tap_position[t] = layout.tap_positions[t];
  constexpr int kFinishThreads = 256;
  const int64_t blocks = std::min<int64_t>(ceil_div(pairs * problem.taps, kFinishThreads), 65535);
  dispatch_dtype(dtype, [&](auto tag) {
    finish_weight_grad_kernel<decltype(tag)><<<static_cast<unsigned>(blocks), kFinishThreads, 0, stream>>>(finish);
  });
}

}  // namespace masked_conv
}  // namespace pixelcnn_kernels
