// Batch norm for CPU tensors in the two dense layouts, walked as two geometries (Geometry below):
// - channels innermost (channels_last, channels_last_3d, (N, C), C-innermost (N, C, L)): a contiguous
//   [R, C] matrix, R = N x spatial rows, one row = one value per channel; the loops run along the rows;
// - contiguous (NCHW, NCDHW, (N, C, L)): N x C "planes" of S contiguous values, one channel each; the
//   loops run along the planes, the per-channel values constant within one.
//
// Why native code: PyTorch's CPU batch norm reads x three times in training (mean, variance, normalize)
// and an activation module reads and writes the result once more; its row-by-row sums are also not
// compensated (perf/NOTES.md, docs/cpu-path.md). Here the statistics take one read (shifted sums, below)
// and the normalization, the residual add and the activation one more read and one write.
//
// Compute type: fp32 for fp32, bf16 and fp16 inputs (as PyTorch's CPU kernels), double for float64
// (acc_t below): every loop, per-channel vector and returned statistic of a float64 input is double.
//
// Accuracy: each channel's values are summed after subtracting a shift, the channel's first value (a
// value of the data itself, so of its scale: at a mean far above the spread, the sums of squares do not
// cancel), in the compute type over blocks (kBlockRows rows; kSpan values of a plane, in vector lanes), and
// the block sums are added in double. The work is cut into tasks by the shape alone (row chunks x channel
// blocks; channels x plane chunks), never by the thread count, and the chunks are merged in order: the
// same input gives bitwise the same result whatever the number of threads.
//
// The files, by role: this header (what everything shares), kernels.h (the kernels' templates),
// kernels_<dtype>_forward.cpp and kernels_<dtype>_backward.cpp (their instantiations), ops.cpp (checks,
// allocation, the running statistics, the C++ autograd node, the registration as torch.ops.triton_bn_cpu.*).
// The split is for the build: the template instantiations (activations x layouts x residual x outputs)
// are nearly all of the compile time, and each dtype's forward and backward compile on a core of their
// own, beside ops.cpp, the one file that includes ATen's heavy headers. triton_bn/build.py builds them
// once per machine; triton_bn/backends/native_cpu.py loads them. Activation ids are those of triton_bn/activations.py,
// and each activation and derivative follows PyTorch's own CPU formula (including at the kinks).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>
#include <vector>

namespace triton_bn_cpu {

// The compute type of an input dtype: double for double, fp32 for the rest.
template <typename T> using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// How the loops see x. Channels innermost with dense rows (x.movedim(1, -1) contiguous: channels_last,
// (N, C), ...): the contiguous [R, C] matrix, R = N x spatial rows. Otherwise x must be contiguous (NCHW,
// NCDHW, (N, C, L)): N x C planes of S contiguous values each, "planes". Tensors read or written beside x
// share its strides.
struct Geometry {
  bool planes;
  int64_t N, C, S, R;  // R = N * S: the values per channel
};

// Per-channel vectors of the backward, in compute type A.
template <typename A> struct BackwardCoefficients {
  std::vector<A> scale, shift, mean, invstd;
  std::vector<A> k1, k2, k3;  // dx = dz * k1 - (x - mean) * k2 - k3
};

// The kernels, instantiated for float, c10::BFloat16, c10::Half and double.
// (mean, biased variance) per channel in the compute type: one read of x.
template <typename T> void statistics(const T* x, const Geometry& g, acc_t<T>* mean, acc_t<T>* var);
// y = act(x * scale + shift [+ residual]), activation ids of triton_bn/activations.py.
template <typename T>
void normalize(const T* x, const T* residual, T* y, const Geometry& g, const std::vector<acc_t<T>>& scale,
               const std::vector<acc_t<T>>& shift, int64_t activation, acc_t<T> slope);
// The backward from k's scale, shift, mean and invstd and the weight w: pass 1 when need_sums (dweight and
// dbias into grad_weight and grad_bias where not null), then dx and d residual where their pointers are
// not null; res is the residual that entered z (null without one, or without an activation).
template <typename T>
void backward(const T* dy, const T* x, const T* res, T* grad_x, T* grad_res, acc_t<T>* grad_weight,
              acc_t<T>* grad_bias, const Geometry& geometry, BackwardCoefficients<acc_t<T>>& k,
              const std::vector<acc_t<T>>& w, bool batch_stats, bool need_sums, int64_t activation, acc_t<T> slope);

// Lanes of the vector type the transcendental activations run on (at::vec::Vectorized of the compute
// type: fp32, double), as built: 16 / 8 for AVX-512, 8 / 4 for AVX2, 4 / 2 for NEON, 1 where ATen's code is
// scalar. Defined in kernels_float_forward.cpp and kernels_double_forward.cpp; the op vector_lanes.
int64_t activation_lanes_float();
int64_t activation_lanes_double();

// The entry points of one dtype: instantiated (PREFIX empty) in kernels_<dtype>_forward.cpp (statistics,
// normalize) and kernels_<dtype>_backward.cpp, declared extern here for the rest.
#define TRITON_BN_FORWARD_KERNELS(PREFIX, T)                                                                  \
  PREFIX template void statistics<T>(const T*, const Geometry&, acc_t<T>*, acc_t<T>*);                       \
  PREFIX template void normalize<T>(const T*, const T*, T*, const Geometry&, const std::vector<acc_t<T>>&,    \
                                    const std::vector<acc_t<T>>&, int64_t, acc_t<T>);
#define TRITON_BN_BACKWARD_KERNELS(PREFIX, T)                                                                 \
  PREFIX template void backward<T>(const T*, const T*, const T*, T*, T*, acc_t<T>*, acc_t<T>*, const Geometry&, \
                                   BackwardCoefficients<acc_t<T>>&, const std::vector<acc_t<T>>&, bool, bool,   \
                                   int64_t, acc_t<T>);
#define TRITON_BN_DECLARE_KERNELS(T) TRITON_BN_FORWARD_KERNELS(extern, T) TRITON_BN_BACKWARD_KERNELS(extern, T)
TRITON_BN_DECLARE_KERNELS(float)
TRITON_BN_DECLARE_KERNELS(c10::BFloat16)
TRITON_BN_DECLARE_KERNELS(c10::Half)
TRITON_BN_DECLARE_KERNELS(double)
#undef TRITON_BN_DECLARE_KERNELS

}  // namespace triton_bn_cpu
