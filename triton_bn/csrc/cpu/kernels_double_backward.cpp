// The backward kernels for double inputs, compiled on their own (common.h says why).
#include "kernels.h"

namespace triton_bn_cpu {
TRITON_BN_BACKWARD_KERNELS(, double)
}  // namespace triton_bn_cpu
