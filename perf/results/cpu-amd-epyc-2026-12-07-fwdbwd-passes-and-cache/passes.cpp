// Each pass of the fp32 channels-last training forward + backward timed alone in a warm loop, the three in
// sequence on the same buffers, and in sequence over 4 sets of buffers in turn (the working set out of cache, as
// in the bench's loop, where the backward's dy and dx come between one forward and the next). Median of 400.
// Build: bash build.sh <repo> passes.cpp passes; run: ./passes N C H (an N x C x H x H channels-last tensor).
#include "kernels.h"
#include <chrono>
#include <cstdio>
#include <cstring>
using namespace triton_bn_cpu;
using clk = std::chrono::steady_clock;
template <typename F> double best_us(F f, int reps = 400) {
  for (int i = 0; i < 20; ++i) f();
  double best = 1e9, sum = 0; std::vector<double> v;
  for (int i = 0; i < reps; ++i) { auto t = clk::now(); f(); double d = std::chrono::duration<double, std::micro>(clk::now() - t).count(); v.push_back(d); }
  std::sort(v.begin(), v.end()); return v[v.size() / 2];
}
int main(int argc, char** argv) {
  at::set_num_threads(2);
  int64_t N = atoi(argv[1]), C = atoi(argv[2]), H = atoi(argv[3]);
  int64_t R = N * H * H, n = R * C;
  std::vector<float> x(n), y(n), dy(n), dx(n);
  for (int64_t i = 0; i < n; ++i) { x[i] = (i * 7919 % 1000) * 0.001f; dy[i] = (i * 104729 % 997) * 0.001f - 0.5f; }
  Geometry g{false, N, C, H * H, R};
  std::vector<float> mean(C), var(C), scale(C, 1.f), shift(C, 0.f), w(C, 1.f), gw(C), gb(C);
  BackwardCoefficients<float> k; k.scale = scale; k.shift = shift; k.mean.assign(C, 0.5f); k.invstd.assign(C, 2.f);
  printf("R=%ld C=%ld %.1f MB\n", R, C, n * 4 / 1e6);
  printf("memcpy (1 thread)       %7.1f us\n", best_us([&] { std::memcpy(y.data(), x.data(), n * 4); }));
  printf("parallel copy           %7.1f us\n", best_us([&] { at::parallel_for(0, n, 32768, [&](int64_t b, int64_t e) { std::memcpy(y.data() + b, x.data() + b, (e - b) * 4); }); }));
  printf("empty parallel_for      %7.1f us\n", best_us([&] { at::parallel_for(0, 2, 1, [&](int64_t, int64_t) {}); }));
  printf("statistics              %7.1f us\n", best_us([&] { statistics<float>(x.data(), g, mean.data(), var.data()); }));
  printf("normalize identity      %7.1f us\n", best_us([&] { normalize<float>(x.data(), nullptr, y.data(), g, scale, shift, 0, 0.f); }));
  printf("backward sums+dx        %7.1f us\n", best_us([&] { backward<float>(dy.data(), x.data(), nullptr, dx.data(), nullptr, gw.data(), gb.data(), g, k, w, true, true, 0, 0.f); }));
  printf("sequence fwd+bwd        %7.1f us\n", best_us([&] { statistics<float>(x.data(), g, mean.data(), var.data()); normalize<float>(x.data(), nullptr, y.data(), g, scale, shift, 0, 0.f); backward<float>(dy.data(), x.data(), nullptr, dx.data(), nullptr, gw.data(), gb.data(), g, k, w, true, true, 0, 0.f); }));
  {
    const int S = 4; std::vector<std::vector<float>> X(S, x), Y(S, y), DY(S, dy), DX(S, dx); int i = 0;
    printf("sequence, 4 rotating sets %7.1f us\n", best_us([&] { int j = i++ % S; statistics<float>(X[j].data(), g, mean.data(), var.data()); normalize<float>(X[j].data(), nullptr, Y[j].data(), g, scale, shift, 0, 0.f); backward<float>(DY[j].data(), X[j].data(), nullptr, DX[j].data(), nullptr, gw.data(), gb.data(), g, k, w, true, true, 0, 0.f); }));
    printf("stats, 4 rotating sets    %7.1f us\n", best_us([&] { int j = i++ % S; statistics<float>(X[j].data(), g, mean.data(), var.data()); }));
    printf("copy, 4 rotating sets     %7.1f us\n", best_us([&] { int j = i++ % S; at::parallel_for(0, n, 32768, [&](int64_t b, int64_t e) { std::memcpy(Y[j].data() + b, X[j].data() + b, (e - b) * 4); }); }));
  }
  printf("backward dx only        %7.1f us\n", best_us([&] { backward<float>(dy.data(), x.data(), nullptr, dx.data(), nullptr, nullptr, nullptr, g, k, w, false, false, 0, 0.f); }));
}
