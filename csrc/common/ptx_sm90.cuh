// The sm_90a (Hopper) PTX instructions the kernels are built from: mbarriers, bulk copies and TMA tile loads
// (cp.async.bulk, cp.async.bulk.tensor), warpgroup matrix multiplies (wgmma) and their shared-memory matrix
// descriptors, and warpgroup register reallocation. Thin wrappers only: each is one instruction (or one instruction in a wait
// loop), named after it, with the PTX ISA section it follows. Include only from code compiled for sm_90a
// (`__CUDA_ARCH_FEAT_SM90_ALL`); wgmma and setmaxnreg do not exist on plain sm_90 (the mbarriers and copies do,
// and code for sm_90 and later may use them).
#pragma once

#include <cuda.h>  // CUtensorMap (a type only: nothing links against the driver)
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace minivllm::ptx {

// ---- mbarrier (PTX ISA "Parallel Synchronization and Communication Instructions: mbarrier") ----
// A 64-bit shared-memory barrier with a phase bit: a phase completes when `count` threads have arrived and
// every byte announced with expect_tx has landed (TMA loads signal their bytes with complete_tx).

__device__ __forceinline__ void mbarrier_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}

// Makes this thread's generic-proxy writes to shared memory (st.shared) visible to the async proxy, which
// wgmma and TMA read and write through ("Memory Consistency Model: Proxies"); a barrier after it then orders
// them before another thread's wgmma.
__device__ __forceinline__ void fence_proxy_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// Makes barrier initialisation (a generic-proxy write) visible to the async proxy (TMA's complete_tx) and to
// the other threads; follow it with a CTA barrier before any thread uses the barriers.
__device__ __forceinline__ void fence_barrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  fence_proxy_async_shared();
}

__device__ __forceinline__ void mbarrier_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}

// Arrives as `count` threads would (one warp releasing a slot for all the warps the barrier waits for).
__device__ __forceinline__ void mbarrier_arrive_count(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}

// Arrives and announces `bytes` more bytes that asynchronous copies will complete in this phase.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}

// Spins until the phase with parity `parity` has completed (acquire: what the arrivals released is visible).
// A fresh barrier is in phase 0, so waiting on parity 1 returns at once: a producer's first wait on an
// "empty" barrier passes without a consumer having arrived.
__device__ __forceinline__ void mbarrier_wait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  while (!done) {
    asm volatile(
        "{\n"
        "  .reg .pred p;\n"
        "  mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "  selp.u32 %0, 1, 0, p;\n"
        "}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  }
}

// ---- Bulk copies (PTX ISA "cp.async.bulk"; sm_90): a contiguous run of bytes, no tensor map ----

// Copies `bytes` (a multiple of 16; both addresses 16-byte aligned) from global memory to shared memory at
// `dst` and signals them on mbarrier `bar`, as a TMA load does.
__device__ __forceinline__ void bulk_copy_to_shared(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst),
      "l"(src), "r"(bytes), "r"(bar)
      : "memory");
}

// ---- TMA (PTX ISA "cp.async.bulk.tensor"; the map is built on the host by cuTensorMapEncodeTiled) ----

// Pulls the tensor map into the constant cache ahead of the first load that uses it.
__device__ __forceinline__ void prefetch_tensor_map(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

// Copies the box at coordinates (c0 innermost, c1, c2) of a 3-D tensor map into shared memory at `dst`,
// laid out (and swizzled) as the map says, and signals its bytes on mbarrier `bar`. Box elements outside the
// tensor are zero-filled and still counted. `map` must live in parameter, constant or global memory: pass
// it in a __grid_constant__ kernel parameter.
__device__ __forceinline__ void tma_load_3d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0, int c1,
                                            int c2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5}], "
      "[%2];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2)
      : "memory");
}

// As tma_load_3d for a 4-D map (c0 innermost).
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0, int c1,
                                            int c2, int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5, %6}], "
      "[%2];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
}

// As tma_load_3d for a 5-D map (c0 innermost).
__device__ __forceinline__ void tma_load_5d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0, int c1,
                                            int c2, int c3, int c4) {
  asm volatile(
      "cp.async.bulk.tensor.5d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5, %6, "
      "%7}], [%2];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(c4)
      : "memory");
}

// ---- Warpgroup register reallocation (PTX ISA "setmaxnreg") ----
// Every warp of a warpgroup must execute the same one. Producers give registers back so that consumers can
// hold a 64-row score tile and output accumulator each.

template <int kRegs>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

template <int kRegs>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

// ---- wgmma (PTX ISA "Asynchronous Warpgroup Level Matrix Multiply-Accumulate Instructions") ----

// Shared-memory matrix descriptor ("Matrix Descriptor Format") of a tile in the 128-byte swizzle layout that
// TMA writes with CU_TENSOR_MAP_SWIZZLE_128B: rows of 128 bytes (64 16-bit elements), swizzled in atoms of 8
// rows (1024 bytes). Bits 0-13: start address >> 4; 16-29: leading-dimension byte offset >> 4; 32-45:
// stride-dimension byte offset >> 4; 49-51: base offset (0: every atom starts 1024-byte aligned); 62-63:
// swizzle mode, 1 = 128 B. The swizzle is a function of the address bits, so a start address may step 32 bytes
// (16 elements of K) inside an atom row, as the K loop of a K-major operand does.
//  - K-major operand (Q as A, K as B of Q K^T): 8-row groups `sbo` = 1024 bytes apart; `lbo` unused (one
//    instruction's 16 elements of K sit inside one 128-byte row) and set to 16 bytes as is conventional.
//  - MN-major operand (V as the transposed B of P V): `lbo` = bytes between 64-element slabs of N, `sbo` =
//    bytes between groups of 8 K rows (1024 in a dense slab).
__device__ __forceinline__ uint64_t smem_desc_sw128(uint32_t addr, uint32_t lbo_bytes, uint32_t sbo_bytes) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>(lbo_bytes >> 4) << 16) |
         (static_cast<uint64_t>(sbo_bytes >> 4) << 32) | (1ull << 62);
}

// Orders this warpgroup's register writes (accumulators, A fragments) before the wgmma that reads them.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }

__device__ __forceinline__ void wgmma_commit_group() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}

// Waits until at most kPending committed wgmma groups of this warpgroup are in flight; their accumulators
// are then readable and their shared-memory operands free to overwrite.
template <int kPending>
__device__ __forceinline__ void wgmma_wait_group() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}

// Pins register operands of wgmma (accumulators, A fragments) at this point of the instruction stream: the
// compiler may not move their reads or writes across it. Use before wgmma_fence (so every write that the fence
// must order is above it) and after wgmma_wait_group (the asm wrote them asynchronously).
template <int N>
__device__ __forceinline__ void wgmma_fence_operands(float (&acc)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(acc[i])::"memory");
}

template <int N>
__device__ __forceinline__ void wgmma_fence_operands(uint32_t (&frag)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(frag[i])::"memory");
}

// Accumulator layout of m64nNk16 with fp32 D (N/2 registers a thread): warp w of the warpgroup holds rows
// 16w..16w+15; register 4i+e of lane (4g + t) is row 16w + g + 8*(e/2), column 8i + 2t + (e%2), the
// mma.m16n8 accumulator layout repeated along N.

#define MINIVLLM_ACC16(d)                                                                                    \
  "+f"((d)[0]), "+f"((d)[1]), "+f"((d)[2]), "+f"((d)[3]), "+f"((d)[4]), "+f"((d)[5]), "+f"((d)[6]),           \
      "+f"((d)[7]), "+f"((d)[8]), "+f"((d)[9]), "+f"((d)[10]), "+f"((d)[11]), "+f"((d)[12]), "+f"((d)[13]), \
      "+f"((d)[14]), "+f"((d)[15])
#define MINIVLLM_ACC32(d) MINIVLLM_ACC16(d), MINIVLLM_ACC16((d) + 16)
#define MINIVLLM_ACC64(d) MINIVLLM_ACC32(d), MINIVLLM_ACC32((d) + 32)
#define MINIVLLM_REGS32                                                                                   \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, " \
  "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define MINIVLLM_REGS64                                                                                   \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, " \
  "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, "  \
  "%42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, "  \
  "%62, %63}"

// D[64 x N] = A[64 x 16] B[16 x N] (+ D when `accumulate`), A and B both K-major in shared memory, given by
// descriptors. Scales +1, no transposes.
template <typename T, int N>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b, bool accumulate);

// D[64 x N] += A[64 x 16] B[16 x N]: A from registers (4 b32 a thread, each warp's 16 rows in the
// mma.m16n8k16 A layout: {row g, k 2t..2t+1}, {row g+8, same k}, {row g, k 2t+8..}, {row g+8, k 2t+8..}),
// B MN-major in shared memory (imm-trans-b = 1, allowed for 16-bit types).
template <typename T, int N>
__device__ __forceinline__ void wgmma_rs_b_mn_major(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc_b);

#define MINIVLLM_WGMMA_SS_N128(CPP_TYPE, PTX_TYPE)                                                           \
  template <>                                                                                                \
  __device__ __forceinline__ void wgmma_ss<CPP_TYPE, 128>(float (&d)[64], uint64_t desc_a, uint64_t desc_b, \
                                                          bool accumulate) {                                \
    asm volatile(                                                                                            \
        "{\n"                                                                                                \
        "  .reg .pred p;\n"                                                                                  \
        "  setp.ne.b32 p, %66, 0;\n"                                                                         \
        "  wgmma.mma_async.sync.aligned.m64n128k16.f32." PTX_TYPE "." PTX_TYPE " " MINIVLLM_REGS64          \
        ", %64, %65, p, 1, 1, 0, 0;\n"                                                                       \
        "}\n"                                                                                                \
        : MINIVLLM_ACC64(d)                                                                                  \
        : "l"(desc_a), "l"(desc_b), "r"(static_cast<int>(accumulate)));                                      \
  }

#define MINIVLLM_WGMMA_RS_N64(CPP_TYPE, PTX_TYPE)                                                           \
  template <>                                                                                               \
  __device__ __forceinline__ void wgmma_rs_b_mn_major<CPP_TYPE, 64>(float (&d)[32], const uint32_t (&a)[4], \
                                                                    uint64_t desc_b) {                      \
    asm volatile(                                                                                           \
        "{\n"                                                                                               \
        "  .reg .pred p;\n"                                                                                 \
        "  setp.ne.b32 p, %37, 0;\n"                                                                        \
        "  wgmma.mma_async.sync.aligned.m64n64k16.f32." PTX_TYPE "." PTX_TYPE " " MINIVLLM_REGS32           \
        ", {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n"                                                         \
        "}\n"                                                                                               \
        : MINIVLLM_ACC32(d)                                                                                 \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));                                 \
  }

#define MINIVLLM_WGMMA_RS_N128(CPP_TYPE, PTX_TYPE)                                                            \
  template <>                                                                                                 \
  __device__ __forceinline__ void wgmma_rs_b_mn_major<CPP_TYPE, 128>(float (&d)[64], const uint32_t (&a)[4], \
                                                                     uint64_t desc_b) {                       \
    asm volatile(                                                                                             \
        "{\n"                                                                                                 \
        "  .reg .pred p;\n"                                                                                   \
        "  setp.ne.b32 p, %69, 0;\n"                                                                          \
        "  wgmma.mma_async.sync.aligned.m64n128k16.f32." PTX_TYPE "." PTX_TYPE " " MINIVLLM_REGS64            \
        ", {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n"                                                           \
        "}\n"                                                                                                 \
        : MINIVLLM_ACC64(d)                                                                                   \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));                                   \
  }

MINIVLLM_WGMMA_SS_N128(__half, "f16")
MINIVLLM_WGMMA_SS_N128(__nv_bfloat16, "bf16")
MINIVLLM_WGMMA_RS_N64(__half, "f16")
MINIVLLM_WGMMA_RS_N64(__nv_bfloat16, "bf16")
MINIVLLM_WGMMA_RS_N128(__half, "f16")
MINIVLLM_WGMMA_RS_N128(__nv_bfloat16, "bf16")

#undef MINIVLLM_WGMMA_SS_N128
#undef MINIVLLM_WGMMA_RS_N64
#undef MINIVLLM_WGMMA_RS_N128
#undef MINIVLLM_REGS32
#undef MINIVLLM_REGS64
#undef MINIVLLM_ACC64
#undef MINIVLLM_ACC32
#undef MINIVLLM_ACC16

}  // namespace minivllm::ptx
