// The forward kernels for c10::BFloat16 inputs, compiled on their own (common.h says why).
#include "kernels.h"

namespace triton_bn_cpu {
TRITON_BN_FORWARD_KERNELS(, c10::BFloat16)
}  // namespace triton_bn_cpu
