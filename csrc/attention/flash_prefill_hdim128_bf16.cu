// One kernel instantiation per file, so the build compiles them in parallel.
#include "flash_prefill_launch.cuh"

template void minivllm::flash::run_flash_prefill<__nv_bfloat16, 128>(const FlashParams&, int, cudaStream_t);
