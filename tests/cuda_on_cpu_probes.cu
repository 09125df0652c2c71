// Kernels with and without the bugs that the sanitizer builds of pixelcnn_kernels.cuda_on_cpu
// must find: `probes NAME` runs one and prints its result (tests/test_cuda_on_cpu_sanitizers.py
// compiles this file as the CUDA kernels' CPU build compiles csrc/*.cu).
#include <cstdio>
#include <cstring>
#include <vector>

constexpr int kThreads = 64;
constexpr int kBlocks = 2;

// Each thread stages its element in shared memory and takes its neighbour's: ordered by the
// barrier between, a race without it.
template <bool kBarrier>
__global__ void rotate_through_shared(const float* in, float* out) {
  __shared__ float staged[kThreads];
  const int t = threadIdx.x;
  staged[t] = in[blockIdx.x * kThreads + t];
  if (kBarrier) __syncthreads();
  out[blockIdx.x * kThreads + t] = staged[(t + 1) % kThreads];
}

// Every block writes the same elements: a race between blocks.
__global__ void overlapping_blocks(const float* in, float* out) {
  out[threadIdx.x] = in[blockIdx.x * kThreads + threadIdx.x];
}

// Each thread reads the element before its own: the first thread, one before the input (the
// heap memory before it, which no thread writes: a bug for AddressSanitizer only).
__global__ void read_before_the_start(const float* in, float* out) {
  const int i = blockIdx.x * kThreads + threadIdx.x;
  out[i] = in[i - 1];
}

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: probes barrier|missing_barrier|overlapping_blocks|read_before_the_start\n");
    return 2;
  }
  const int n = kBlocks * kThreads;
  std::vector<float> in(n), out(n);  // heap memory, sized exactly: AddressSanitizer guards its ends
  for (int i = 0; i < n; ++i) in[i] = static_cast<float>(i);
  const char* probe = argv[1];
  if (std::strcmp(probe, "barrier") == 0) {
    rotate_through_shared<true><<<kBlocks, kThreads, 0, nullptr>>>(in.data(), out.data());
  } else if (std::strcmp(probe, "missing_barrier") == 0) {
    rotate_through_shared<false><<<kBlocks, kThreads, 0, nullptr>>>(in.data(), out.data());
  } else if (std::strcmp(probe, "overlapping_blocks") == 0) {
    overlapping_blocks<<<kBlocks, kThreads, 0, nullptr>>>(in.data(), out.data());
  } else if (std::strcmp(probe, "read_before_the_start") == 0) {
    read_before_the_start<<<kBlocks, kThreads, 0, nullptr>>>(in.data(), out.data());
  } else {
    std::fprintf(stderr, "unknown probe %s\n", probe);
    return 2;
  }
  double checksum = 0;
  for (float v : out) checksum += v;
  std::printf("checksum %.1f\n", checksum);
  return 0;
}
