// The eager GPU path's C++ side: a plan (what Python decided for one call's shapes, layouts, dtypes and
// flags) and the launches that execute it, through the CUDA driver or a stand-in that records them.
//
// Python decides everything (triton_bn/backends/cpp_launch.py builds a plan by watching the launchers run one call
// and reading each compiled kernel's parameter list): which kernels, grids, warps, shared memory, scalar
// values, which tensor goes to which pointer parameter, what to allocate. C++ only checks that a call
// is one the plan was made for (matches) and executes it (run): allocate, pack, launch. It never
// re-derives a decision; a call the plan does not fit returns no result and Python takes over.
//
// Tensors are named by slot (Slot, plan_ids.h): the call's inputs, the outputs the plan allocates, per-call
// scratch, and persistent buffers the plan holds (the arrival counters, the dummy pointer argument).
#pragma once

#include <ATen/ATen.h>

#include "plan_ids.h"

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace triton_bn_cuda {

// The slots (every tensor a plan can name), allocations, parameter kinds and call scalars: plan_ids.h, written
// from triton_bn/backends/plan_numbering.py, the one numbering this C++ and cpp_launch.py share.

struct Param {
  ParamKind kind;
  int64_t slot;     // kPointer: the tensor's slot; kF32: the call's scalar of that index, or -1 for `real`
  int64_t integer;  // kI32, kI64, kI8: the value
  double real;      // kF32 with slot -1: the value (1 / n, n / (n - 1): constants of the plan's shape)
};

struct Launch {
  std::string name;
  int64_t function;  // CUfunction, as an integer (0 under a stand-in driver)
  std::array<int64_t, 3> grid;
  int64_t block, shared;
  std::vector<Param> params;
};

// One expected input: defined or not; and when defined, its dtype, sizes, strides and whether its
// address is 16-byte aligned (Triton compiles a variant per alignment).
struct Expectation {
  int64_t slot;
  bool defined;
  int64_t dtype;
  std::vector<int64_t> sizes, strides;
  bool aligned;
};

struct Output {
  int64_t slot;
  Allocation allocation;
  int64_t numel;  // kPerChannel, kScratch
  int64_t workspace_offset;  // kPerChannel, kScratch: where in the call's one fp32 workspace (16-byte aligned)
};

class Plan {
 public:
  // The flat encoding cpp_launch.py writes (see Plan.__init__ there):
  //   expectations: per input [slot, defined, dtype, aligned, ndim, sizes..., strides...]
  //   outputs:      per output [slot, allocation, numel]
  //   launches:     per launch [function, grid x3, block, shared, nparams, per param (kind, slot, integer)]
  //   reals:        the fp32 parameters' values, in order (used where the slot is -1); names: the kernels'
  //                 names
  Plan(std::vector<int64_t> expectations, std::vector<int64_t> outputs, std::vector<int64_t> launches,
       std::vector<double> reals, std::vector<std::string> names, std::vector<at::Tensor> persistent,
       at::Device device);

  // Whether this call's tensors are those the plan was made for (each one given or not as then, with the
  // same dtype, sizes, strides and alignment, all on the device the plan was made for: its persistent buffers
  // and its compiled functions are that device's, type and index).
  bool matches(const std::array<at::Tensor, kSlots>& tensors) const;
  // Allocate the outputs into `tensors`, then launch every kernel on the current stream. `scalars` are the
  // call's (eps, momentum, negative_slope): module attributes a user may change between calls.
  void run(std::array<at::Tensor, kSlots>& tensors, const std::vector<double>& scalars) const;

  int64_t launch_count() const { return static_cast<int64_t>(launches_.size()); }

 private:
  std::vector<Expectation> expectations_;
  std::vector<Output> outputs_;
  int64_t workspace_numel_ = 0;  // fp32 values of the per-channel outputs and scratch, all in one allocation
  std::vector<Launch> launches_;
  std::vector<at::Tensor> persistent_;
  at::Device device_;
};

// Plans live in a registry and travel to and from Python as integer handles: an op's argument of a
// custom class costs microseconds more to convert per call than an int (plan.cpp).
int64_t register_plan(std::shared_ptr<const Plan> plan);
std::shared_ptr<const Plan> plan_of(int64_t handle);  // null for -1
// Every handle given so far made invalid (the plans live on where a call table entry or a node holds them).
void forget_registered_plans();

// -- the driver (driver.cpp) ---------------------------------------------------------------------------------
// "real": cuLaunchKernel from libcuda.so.1 (dlopen'ed on first use); "record": every launch appended to a
// list (recorded_json) instead; "null": nothing (host-cost measurements).
void set_driver(const std::string& mode);
std::string driver();
void launch(const Launch& spec, void** params, const std::vector<uint64_t>& words, const at::Device& device);
// The current stream's handle on `device` under the real driver (0 for a CPU tensor or a stand-in), and
// whether it is capturing a CUDA graph (then no plan serves: the Python path has the capture rules).
uint64_t current_stream(const at::Device& device);
bool capturing(const at::Device& device);
std::string recorded_json();
void clear_recorded();

}  // namespace triton_bn_cuda
