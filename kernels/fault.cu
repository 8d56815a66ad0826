// fault_trap: TEST HOOK, not a model op. Executes `__trap()` when `arm` is non-zero, which aborts
// the kernel and leaves a sticky error in its context (the driver then fails every later call
// there with CUDA_ERROR_ILLEGAL_INSTRUCTION or CUDA_ERROR_LAUNCH_FAILED). The tests use it to
// produce a genuine device fault and check that the engine turns into DeviceLost
// (tests/gpu/fault.rs); `arm == 0` is a no-op launch.
// Launch: one block of JV4_THREADS threads.
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(JV4_THREADS) fault_trap(int arm) {
    if (arm != 0 && threadIdx.x == 0) {
        __trap();
    }
}
