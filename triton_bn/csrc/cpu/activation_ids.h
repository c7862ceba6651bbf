// Written by tools/activation_header.py from the activation table (triton_bn/activations.py): edit the
// table, then run the script (tests/test_activation_table.py fails while this file is not the table's).
#pragma once

#include <cstdint>

namespace triton_bn_cpu {

constexpr int kIdentity = 0;  // None
constexpr int kRelu = 1;  // 'relu'
constexpr int kLeakyRelu = 2;  // 'leaky_relu'
constexpr int kRelu6 = 3;  // 'relu6'
constexpr int kSilu = 4;  // 'silu'
constexpr int kGelu = 5;  // 'gelu'
constexpr int kGeluTanh = 6;  // 'gelu_tanh'
constexpr int kHardswish = 7;  // 'hardswish'
constexpr int kSigmoid = 8;  // 'sigmoid'
constexpr int kActivationCount = 9;  // ids are 0 .. kActivationCount - 1

// The table's vector_math: the activations kernels.h computes in vector registers
// (at::vec::Vectorized, activate_vec). Their lines read each vector of x before they write the same
// positions of y, and nothing else, so y may be x (ops.cpp's activate_).
constexpr bool computed_in_vectors(int64_t activation) {
  return activation == kSilu || activation == kGelu || activation == kGeluTanh || activation == kSigmoid;
}

}  // namespace triton_bn_cpu
