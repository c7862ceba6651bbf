// Written by tools/plan_header.py from triton_bn/backends/plan_numbering.py, which cpp_launch.py reads:
// edit that file, then run the script (tests/test_launch.py fails while this file is not its).
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace triton_bn_cuda {

enum Slot : int64_t {
  kX = 0,
  kResidual = 1,
  kWeight = 2,
  kBias = 3,
  kRunningMean = 4,
  kRunningVar = 5,
  kNumBatches = 6,
  kMean = 7,
  kStat = 8,
  kY = 9,
  kGradY = 10,
  kGradX = 11,
  kGradResidual = 12,
  kGradWeight = 13,
  kGradBias = 14,
  kFirstScratch = 16,
  kFirstPersistent = 32,
  kSlots = 48,
};
enum Allocation : int64_t {
  kLikeX = 0,
  kPerChannel = 1,
  kLikeWeight = 2,
  kLikeBias = 3,
  kScratch = 4,
};
enum ParamKind : int64_t {
  kPointer = 0,
  kI32 = 1,
  kI64 = 2,
  kF32 = 3,
  kI8 = 4,
  kNullPointer = 5,
};
enum CallScalar : int64_t {
  kEps = 0,
  kMomentum = 1,
  kNegativeSlope = 2,
};

static_assert(static_cast<int>(c10::ScalarType::Float) == 6, "torch.float32's c10 number");
static_assert(static_cast<int>(c10::ScalarType::Half) == 5, "torch.float16's c10 number");
static_assert(static_cast<int>(c10::ScalarType::BFloat16) == 15, "torch.bfloat16's c10 number");
static_assert(static_cast<int>(c10::ScalarType::Double) == 7, "torch.float64's c10 number");
static_assert(static_cast<int>(c10::ScalarType::Long) == 4, "torch.int64's c10 number");
static_assert(static_cast<int>(c10::ScalarType::Int) == 3, "torch.int32's c10 number");

}  // namespace triton_bn_cuda
