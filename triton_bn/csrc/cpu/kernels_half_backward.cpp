// The backward kernels for c10::Half inputs, compiled on their own (common.h says why).
#include "kernels.h"

namespace triton_bn_cpu {
TRITON_BN_BACKWARD_KERNELS(, c10::Half)
}  // namespace triton_bn_cpu
