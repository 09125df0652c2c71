// The fiber scheduler and the emulated instructions of cuda_on_cpu.h.
#include <sys/mman.h>
#include <unistd.h>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif
#if CUDA_ON_CPU_RACECHECK
#include <sanitizer/tsan_interface.h>
#endif

#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

namespace cuda_on_cpu {
namespace {

constexpr int kWarpSize = 32;
constexpr std::size_t kStackBytes = 512 * 1024;  // kernels keep tiles of accumulators on the stack
constexpr std::size_t kSharedBytes = 228 * 1024;  // an H200 SM's shared memory, the most a block may have

enum class Waiting { kNothing, kBlockBarrier, kWarp, kDone };

// A suspended execution context: a fiber's, or the scheduler's while a fiber runs. On x86-64
// a switch saves the callee-saved registers on the stack it leaves and restores them from the
// one it enters (no system call: ucontext's swapcontext also saves the signal mask, a system
// call per switch, and the kernels switch at every barrier and warp-synchronous op).
#if defined(__x86_64__)
struct Context {
  void* stack_pointer = nullptr;
};

extern "C" void cuda_on_cpu_switch(void** save, void* load);
asm(R"(
  .text
  .globl cuda_on_cpu_switch
  .hidden cuda_on_cpu_switch
  .type cuda_on_cpu_switch, @function
cuda_on_cpu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cuda_on_cpu_switch, .-cuda_on_cpu_switch
)");

void switch_context(Context& save, const Context& load) { cuda_on_cpu_switch(&save.stack_pointer, load.stack_pointer); }

// A context that enters `entry` (which must never return) on the stack [stack, stack + bytes).
void make_context(Context& context, void* stack, std::size_t bytes, void (*entry)()) {
  auto* top = reinterpret_cast<uintptr_t*>((reinterpret_cast<uintptr_t>(stack) + bytes) & ~uintptr_t{15});
  top[-1] = 0;                                   // entry's return address: none
  top[-2] = reinterpret_cast<uintptr_t>(entry);  // where cuda_on_cpu_switch's ret goes
  for (int i = 3; i <= 8; ++i) top[-i] = 0;      // the six callee-saved registers it pops
  context.stack_pointer = top - 8;
}
#else
struct Context {
  ucontext_t context;
};

void switch_context(Context& save, const Context& load) { swapcontext(&save.context, &load.context); }

void make_context(Context& context, void* stack, std::size_t bytes, void (*entry)()) {
  getcontext(&context.context);
  context.context.uc_stack.ss_sp = stack;
  context.context.uc_stack.ss_size = bytes;
  context.context.uc_link = nullptr;
  makecontext(&context.context, entry, 0);
}
#endif

// The racecheck build (CUDA_ON_CPU_RACECHECK: the kernels compiled with -fsanitize=thread,
// this runtime not: it plays the hardware). ThreadSanitizer sees every CUDA thread of every
// block as a fiber of its own, and switches between fibers order nothing; the runtime tells
// it the orderings CUDA gives: the launch before every thread, __syncthreads among a block's
// threads, a warp-synchronous op among a warp's lanes, every thread before the host's next
// step. Shared memory and the fibers' stacks are new memory to it at every block, as on the
// GPU. So it reports any two CUDA threads' accesses to one address, one of them a write,
// that no barrier orders, in shared or global memory: racecheck's hazards, and more.
namespace race {
#if CUDA_ON_CPU_RACECHECK
extern "C" void __tsan_read_range(void* address, unsigned long bytes);  // what instrumented code calls for a read

void* current() { return __tsan_get_current_fiber(); }
void* thread_begin(const std::string& name) {
  void* fiber = __tsan_create_fiber(0);
  __tsan_set_fiber_name(fiber, name.c_str());
  return fiber;
}
void thread_end(void* fiber) { __tsan_destroy_fiber(fiber); }
void switch_to(void* fiber) { __tsan_switch_to_fiber(fiber, __tsan_switch_to_fiber_no_sync); }
void release(void* sync) { __tsan_release(sync); }
void acquire(void* sync) { __tsan_acquire(sync); }
void read(const void* address, std::size_t bytes) { __tsan_read_range(const_cast<void*>(address), bytes); }
// Mapping fresh pages over the memory (whole pages) is what makes it new to ThreadSanitizer.
void new_memory(void* memory, std::size_t bytes) {
  if (mmap(memory, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0) == MAP_FAILED)
    throw std::runtime_error("cuda_on_cpu: cannot renew a block's memory");
}
// A fiber's stack, from the lowest page the previous block's fiber touched (resident: fresh
// pages are not) to its top: the rest is still new.
void new_stack(void* stack, std::size_t bytes) {
  const std::size_t page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
  std::vector<unsigned char> resident(bytes / page);
  std::size_t first = 0;
  if (mincore(stack, bytes, resident.data()) == 0)
    while (first < resident.size() && (resident[first] & 1) == 0) ++first;
  if (first < resident.size()) new_memory(static_cast<unsigned char*>(stack) + first * page, bytes - first * page);
}
#else
void* current() { return nullptr; }
void* thread_begin(const std::string&) { return nullptr; }
void thread_end(void*) {}
void switch_to(void*) {}
void release(void*) {}
void acquire(void*) {}
void read(const void*, std::size_t) {}
void new_memory(void*, std::size_t) {}
void new_stack(void*, std::size_t) {}
#endif
}  // namespace race

struct Fiber {
  Context context;
  uint3 index;
  Waiting waiting = Waiting::kNothing;
  unsigned exchanges = 0;  // warp-synchronous ops passed: its parity picks the exchange buffer
  unsigned barriers = 0;   // __syncthreads passed
  void* race_thread = nullptr;
};

// A warp's mma.sync operands as matrices, decoded from its lanes' fragments by the first lane to
// get there; `op` numbers the warp-synchronous op (every lane passes the same ones in turn).
struct MmaOperands {
  unsigned op = ~0u;
  float a[16][16];
  float b[16][8];
};

// One launch's state; the running block's fibers share it.
struct Launch {
  dim3 grid;
  dim3 block;
  uint3 block_index;
  const std::function<void()>* body = nullptr;
  std::vector<Fiber> fibers;
  int current = -1;
  Context scheduler;
  std::vector<unsigned char> exchange;  // [parity][warp][lane][kExchangeBytes]
  unsigned char* shared = nullptr;  // the dynamic shared memory, then the static arrays
  std::size_t shared_used = 0;
  std::vector<std::pair<const void*, std::size_t>> static_shared;  // (declaration, offset)
  std::vector<MmaOperands> mma_operands;  // per warp
  std::string error;
  // What the racecheck build's orderings release and acquire: the launch, the grid's end,
  // a block's barriers and each warp's synchronous ops (by the parity of their count: no
  // thread gets two barriers ahead of another).
  void* race_host = nullptr;
  char launched = 0, finished = 0, barrier[2] = {};
  std::vector<char> warp_op;  // [parity][warp]
};

thread_local Launch* running = nullptr;
thread_local cudaError_t last_error = cudaSuccess;

void* map_pages(std::size_t bytes) {
  void* memory = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (memory == MAP_FAILED) throw std::runtime_error("cuda_on_cpu: cannot map memory for a block");
  return memory;
}

// Fiber stacks and the shared memory, reused from launch to launch (mapped lazily: untouched
// pages cost nothing).
std::vector<void*>& stacks(std::size_t count) {
  thread_local std::vector<void*> pool;
  while (pool.size() < count) pool.push_back(map_pages(kStackBytes));
  return pool;
}

// kSharedBytes, all bits set beyond the first `used` bytes (which blocks have used since).
struct SharedMemory {
  unsigned char* memory = nullptr;
  std::size_t used = 0;
};

SharedMemory& shared_memory() {
  thread_local SharedMemory shared = [] {
    SharedMemory fresh{static_cast<unsigned char*>(map_pages(kSharedBytes)), 0};
    std::memset(fresh.memory, 0xff, kSharedBytes);
    return fresh;
  }();
  return shared;
}

Fiber& current_fiber() { return running->fibers[running->current]; }

[[noreturn]] void fiber_main() {
  Launch& launch = *running;
  race::acquire(&launch.launched);
  (*launch.body)();
  race::release(&launch.finished);
  Fiber& fiber = launch.fibers[launch.current];
  fiber.waiting = Waiting::kDone;
  race::switch_to(launch.race_host);
  switch_context(fiber.context, launch.scheduler);  // never resumed
  std::abort();
}

// Suspends the running fiber until `what` lets it go on; `sync` orders it after the others' steps
// before theirs (the racecheck build's view of a barrier).
void wait(Waiting what, void* sync) {
  Fiber& fiber = current_fiber();
  fiber.waiting = what;
  race::release(sync);
  race::switch_to(running->race_host);
  switch_context(fiber.context, running->scheduler);
  race::acquire(sync);
}

std::string where(const Launch& launch) {
  return "block (" + std::to_string(launch.block_index.x) + ", " + std::to_string(launch.block_index.y) + ", " +
         std::to_string(launch.block_index.z) + ")";
}

// Lets go the fibers that may go on: a warp whose live lanes all wait at a warp-synchronous op,
// else the block when every live thread waits at __syncthreads. False when nothing may go on
// (every fiber done, or a deadlock: then launch.error says why).
bool release(Launch& launch) {
  bool released = false;
  const int count = static_cast<int>(launch.fibers.size());
  for (int warp0 = 0; warp0 < count; warp0 += kWarpSize) {
    const int end = std::min(count, warp0 + kWarpSize);
    int at_warp = 0, done = 0;
    for (int i = warp0; i < end; ++i) {
      at_warp += launch.fibers[i].waiting == Waiting::kWarp;
      done += launch.fibers[i].waiting == Waiting::kDone;
    }
    if (at_warp == 0) continue;
    if (at_warp != end - warp0) {
      launch.error = "warp " + std::to_string(warp0 / kWarpSize) + " of " + where(launch) + ": " +
                     std::to_string(at_warp) + " lanes wait at a warp-synchronous op, " + std::to_string(done) +
                     " have exited, the others wait at __syncthreads";
      return false;
    }
    for (int i = warp0; i < end; ++i) launch.fibers[i].waiting = Waiting::kNothing;
    released = true;
  }
  if (released) return true;
  int at_barrier = 0;
  for (const Fiber& fiber : launch.fibers) at_barrier += fiber.waiting == Waiting::kBlockBarrier;
  if (at_barrier == 0) return false;  // all done
  for (Fiber& fiber : launch.fibers)
    if (fiber.waiting == Waiting::kBlockBarrier) fiber.waiting = Waiting::kNothing;
  return true;
}

void run_block(Launch& launch) {
  const int count = static_cast<int>(launch.fibers.size());
  std::vector<void*>& pool = stacks(count);
  // A block's shared memory as the GPU gives it: what other blocks left, so all bits set here (a
  // float NaN: a value read before this block wrote it shows); it and the stacks new to ThreadSanitizer.
  SharedMemory& shared = shared_memory();
  if (shared.used > 0) {
    const std::size_t page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
    const std::size_t bytes = std::min(kSharedBytes, (shared.used + page - 1) / page * page);
    race::new_memory(shared.memory, bytes);
    std::memset(shared.memory, 0xff, bytes);
    shared.used = 0;
  }
  race::release(&launch.launched);
  for (int i = 0; i < count; ++i) {
    Fiber& fiber = launch.fibers[i];
    fiber.index = {static_cast<unsigned>(i) % launch.block.x, static_cast<unsigned>(i) / launch.block.x % launch.block.y,
                   static_cast<unsigned>(i) / (launch.block.x * launch.block.y)};
    fiber.waiting = Waiting::kNothing;
    fiber.exchanges = 0;
    fiber.barriers = 0;
    race::new_stack(pool[i], kStackBytes);
    make_context(fiber.context, pool[i], kStackBytes, fiber_main);
    fiber.race_thread = race::thread_begin("CUDA thread " + std::to_string(i) + " of " + where(launch));
  }
  for (MmaOperands& operands : launch.mma_operands) operands.op = ~0u;
  do {
    for (int i = 0; i < count; ++i) {
      if (launch.fibers[i].waiting != Waiting::kNothing) continue;
      launch.current = i;
      race::switch_to(launch.fibers[i].race_thread);
      switch_context(launch.scheduler, launch.fibers[i].context);
    }
  } while (release(launch));
  launch.current = -1;
  shared.used = launch.shared_used;
  for (Fiber& fiber : launch.fibers) race::thread_end(fiber.race_thread);
}

}  // namespace

const uint3& thread_index() { return current_fiber().index; }
const uint3& block_index() { return running->block_index; }
const dim3& block_dim() { return running->block; }
const dim3& grid_dim() { return running->grid; }

void syncthreads() { wait(Waiting::kBlockBarrier, &running->barrier[current_fiber().barriers++ % 2]); }

int lane_id() { return running->current % kWarpSize; }

const unsigned char* warp_exchange(const void* mine, std::size_t bytes) {
  Launch& launch = *running;
  Fiber& fiber = current_fiber();
  const std::size_t warps = (launch.fibers.size() + kWarpSize - 1) / kWarpSize;
  const unsigned parity = fiber.exchanges++ % 2;
  unsigned char* buffer = launch.exchange.data() + parity * warps * kWarpSize * kExchangeBytes;
  unsigned char* warp = buffer + (launch.current / kWarpSize) * kWarpSize * kExchangeBytes;
  std::memcpy(warp + lane_id() * kExchangeBytes, mine, bytes);
  wait(Waiting::kWarp, &launch.warp_op[parity * warps + launch.current / kWarpSize]);
  return warp;
}

void* dynamic_shared() { return running->shared; }

void* static_shared(const void* declaration, std::size_t bytes, std::size_t alignment) {
  Launch& launch = *running;
  for (const auto& [known, offset] : launch.static_shared)
    if (known == declaration) return launch.shared + offset;
  const std::size_t offset = (launch.shared_used + alignment - 1) / alignment * alignment;
  if (offset + bytes > kSharedBytes) {
    std::fprintf(stderr, "cuda_on_cpu: the kernel's shared memory exceeds an H200 SM's %zu bytes\n", kSharedBytes);
    std::abort();  // as __trap(): a fiber cannot unwind into the scheduler
  }
  launch.shared_used = offset + bytes;
  launch.static_shared.emplace_back(declaration, offset);
  return launch.shared + offset;
}

void trap() {
  std::fprintf(stderr, "cuda_on_cpu: __trap() in %s, thread %d\n", where(*running).c_str(), running->current);
  std::abort();
}

void run_grid(dim3 grid, dim3 block, std::size_t shared_bytes, const std::function<void()>& body) {
  const unsigned threads = block.x * block.y * block.z;
  if (threads == 0 || threads > 1024 || grid.x * grid.y * grid.z == 0 || grid.y > 65535 || grid.z > 65535 || shared_bytes > kSharedBytes) {
    last_error = cudaErrorInvalidConfiguration;
    return;
  }
  if (running != nullptr) throw std::logic_error("cuda_on_cpu: a kernel launched a kernel");
  Launch launch;
  launch.grid = grid;
  launch.block = block;
  launch.body = &body;
  launch.fibers.resize(threads);
  launch.exchange.resize(2 * ((threads + kWarpSize - 1) / kWarpSize) * kWarpSize * kExchangeBytes);
  launch.shared = shared_memory().memory;
  launch.shared_used = shared_bytes;
  launch.mma_operands.resize((threads + kWarpSize - 1) / kWarpSize);
  launch.warp_op.resize(2 * ((threads + kWarpSize - 1) / kWarpSize));
  launch.race_host = race::current();
  running = &launch;
  for (unsigned z = 0; z < grid.z && launch.error.empty(); ++z)
    for (unsigned y = 0; y < grid.y && launch.error.empty(); ++y)
      for (unsigned x = 0; x < grid.x && launch.error.empty(); ++x) {
        launch.block_index = {x, y, z};
        run_block(launch);
      }
  running = nullptr;
  race::acquire(&launch.finished);
  if (!launch.error.empty()) throw std::runtime_error("cuda_on_cpu: " + launch.error);
}

void load_matrices_x4(uint32_t (&r)[4], const void* row_address, bool transposed) {
  const unsigned char* slots = warp_exchange(&row_address, sizeof(row_address));
  auto row = [&](int lane) {
    const void* address;
    std::memcpy(&address, slots + lane * kExchangeBytes, sizeof(address));
    race::read(address, 16);  // the warp reads the 8 elements of every row it was given; this lane stands for it
    return static_cast<const uint16_t*>(address);
  };
  const int g = lane_id() / 4, t = lane_id() % 4;
  for (int j = 0; j < 4; ++j) {
    const uint16_t first = transposed ? row(8 * j + 2 * t)[g] : row(8 * j + g)[2 * t];
    const uint16_t second = transposed ? row(8 * j + 2 * t + 1)[g] : row(8 * j + g)[2 * t + 1];
    r[j] = uint32_t{first} | (uint32_t{second} << 16);
  }
}

namespace {

float element(uint32_t bits, int half, MmaInput input) {
  if (input == MmaInput::kTf32) {
    float v;
    std::memcpy(&v, &bits, sizeof(v));
    return v;
  }
  const uint16_t raw = static_cast<uint16_t>(bits >> (16 * half));
  if (input == MmaInput::kBFloat16) {
    const uint32_t widened = uint32_t{raw} << 16;
    float v;
    std::memcpy(&v, &widened, sizeof(v));
    return v;
  }
  __half h;
  std::memcpy(&h, &raw, sizeof(h));
  return __half2float(h);
}

}  // namespace

void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], MmaInput input) {
  uint32_t mine[6] = {a[0], a[1], a[2], a[3], b[0], b[1]};
  const unsigned char* slots = warp_exchange(mine, sizeof(mine));
  auto reg = [&](int lane, int i) {
    uint32_t v;
    std::memcpy(&v, slots + lane * kExchangeBytes + i * sizeof(uint32_t), sizeof(v));
    return v;
  };
  // A (16 x K) and B (K x 8) from the fragments (PTX ISA, "Matrix Fragments for mma.m16n8k16 /
  // mma.m16n8k8"): lane 4g + t holds A rows g, g + 8 and B column g.
  const bool tf32 = input == MmaInput::kTf32;
  const int k_size = tf32 ? 8 : 16;
  MmaOperands& operands = running->mma_operands[running->current / kWarpSize];
  auto& a_full = operands.a;
  auto& b_full = operands.b;
  const unsigned op = current_fiber().exchanges;
  for (int lane = 0; lane < kWarpSize && operands.op != op; ++lane) {
    const int g = lane / 4, t = lane % 4;
    for (int i = 0; i < 4; ++i) {
      const int row = g + (i % 2) * 8;
      if (tf32) {
        a_full[row][t + (i / 2) * 4] = element(reg(lane, i), 0, input);
      } else {
        for (int h = 0; h < 2; ++h) a_full[row][2 * t + h + (i / 2) * 8] = element(reg(lane, i), h, input);
      }
    }
    for (int i = 0; i < 2; ++i) {
      if (tf32) {
        b_full[t + i * 4][g] = element(reg(lane, 4 + i), 0, input);
      } else {
        for (int h = 0; h < 2; ++h) b_full[2 * t + h + i * 8][g] = element(reg(lane, 4 + i), h, input);
      }
    }
  }
  operands.op = op;
  const int g = lane_id() / 4, t = lane_id() % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = g + (i / 2) * 8, col = 2 * t + i % 2;
    float sum = d[i];
    for (int k = 0; k < k_size; ++k) sum += a_full[row][k] * b_full[k][col];
    d[i] = sum;
  }
}

uint32_t to_tf32_rna(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  if ((bits & 0x7f800000u) != 0x7f800000u) bits += 0x1000u;  // half of the 13 dropped bits: ties away (sign-magnitude)
  return bits & 0xffffe000u;
}

cudaError_t get_last_error() {
  const cudaError_t error = last_error;
  last_error = cudaSuccess;
  return error;
}

const char* get_error_string(cudaError_t error) {
  return error == cudaSuccess ? "no error" : "invalid configuration argument (cuda_on_cpu)";
}

cudaError_t get_device(int* device) {
  *device = 0;
  return cudaSuccess;
}

// The H200's, so the launchers plan their grids as they do there.
cudaError_t device_get_attribute(int* value, cudaDeviceAttr attribute, int) {
  switch (attribute) {
    case cudaDevAttrMultiProcessorCount: *value = 132; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; return cudaSuccess;
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t memset_async(void* dst, int value, std::size_t bytes, cudaStream_t) {
  std::memset(dst, value, bytes);
  return cudaSuccess;
}

}  // namespace cuda_on_cpu
