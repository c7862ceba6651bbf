// base and new normalize on 16-bit NCHW planes, alternating call by call; median ratio base/new
#include <c10/util/Half.h>
#include <c10/util/BFloat16.h>
#include <vector>
#include <ATen/Parallel.h>
#include <chrono>
#include <cstdio>
#include <algorithm>
using clk = std::chrono::steady_clock;
namespace base_ns { template <typename T> void entry(const T*, T*, int64_t, int64_t, int64_t, const std::vector<float>&, const std::vector<float>&, int64_t); }
namespace new_ns { template <typename T> void entry(const T*, T*, int64_t, int64_t, int64_t, const std::vector<float>&, const std::vector<float>&, int64_t); }
template <typename T> void run(const char* name, int64_t N, int64_t C, int64_t H, int64_t act) {
  int64_t S = H * H, n = N * C * S;
  std::vector<T> x(n), y0(n), y1(n);
  for (int64_t i = 0; i < n; ++i) x[i] = T((i * 7919 % 1000) * 0.002f - 1.f);
  
  std::vector<float> scale(C), shift(C);
  for (int64_t c = 0; c < C; ++c) { scale[c] = 0.5f + c * 0.001f; shift[c] = 0.1f - c * 0.0003f; }
  std::vector<double> tb, tn, ratio;
  for (int i = 0; i < 1500; ++i) {
    auto t0 = clk::now(); base_ns::entry<T>(x.data(), y0.data(), N, C, S, scale, shift, act);
    auto t1 = clk::now(); new_ns::entry<T>(x.data(), y1.data(), N, C, S, scale, shift, act);
    auto t2 = clk::now();
    if (i < 50) continue;
    double b = std::chrono::duration<double, std::micro>(t1 - t0).count(), nn = std::chrono::duration<double, std::micro>(t2 - t1).count();
    tb.push_back(b); tn.push_back(nn); ratio.push_back(b / nn);
  }
  auto med = [](std::vector<double> v) { std::sort(v.begin(), v.end()); return v[v.size() / 2]; };
  bool same = std::equal(y0.begin(), y0.end(), y1.begin(), [](T a, T b) { return a.x == b.x; });
  printf("%s %ldx%ldx%ldx%ld act %ld: base %.1f us new %.1f us, median ratio %.3f, bitwise equal %d\n", name, N, C, H, H, act, med(tb), med(tn), med(ratio), same);
}
int main() {
  at::set_num_threads(2);
  for (int64_t act : {0, 1}) {
    run<c10::Half>("fp16", 2, 2048, 7, act); run<c10::Half>("fp16", 8, 512, 7, act); run<c10::Half>("fp16", 1, 256, 3, act); run<c10::Half>("fp16", 4, 64, 5, act);
    run<c10::BFloat16>("bf16", 2, 2048, 7, act); run<c10::BFloat16>("bf16", 8, 512, 7, act); run<c10::BFloat16>("bf16", 1, 256, 3, act); run<c10::BFloat16>("bf16", 4, 64, 5, act);
  }
}
