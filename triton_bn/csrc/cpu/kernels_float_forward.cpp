// The forward kernels for float inputs, compiled on their own (common.h says why).
#include "kernels.h"

namespace triton_bn_cpu {
TRITON_BN_FORWARD_KERNELS(, float)
int64_t activation_lanes_float() { return Vec<float>::size(); }
}  // namespace triton_bn_cpu
