// The forward kernels for double inputs, compiled on their own (common.h says why).
#include "kernels.h"

namespace triton_bn_cpu {
TRITON_BN_FORWARD_KERNELS(, double)
int64_t activation_lanes_double() { return Vec<double>::size(); }
}  // namespace triton_bn_cpu
