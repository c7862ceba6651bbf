// The stats pass in row order, then the normalize pass over 64 KB blocks in row order (mode 0) or in reverse block
// order (mode 1: the blocks read last by the stats pass first, while they may still be in cache), 2 threads.
// stats pass (read x, forward order) then normalize pass (read x, write y) in forward or reverse-block order
#include <omp.h>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <cstring>
#include <algorithm>
using clk = std::chrono::steady_clock;
int main(int argc, char** argv) {
  const long C = 64;
  long sizes_mb[] = {3, 6, 13, 26, 51};
  for (long mb : sizes_mb) {
    long n = mb * 1000000 / 4; n -= n % C; long R = n / C;
    float* x = (float*)aligned_alloc(64, n * 4);
    float* y = (float*)aligned_alloc(64, n * 4);
    for (long i = 0; i < n; ++i) x[i] = (i % 97) * 0.01f;
    memset(y, 0, n*4);
    std::vector<float> sc(C, 1.5f), sh(C, 0.5f);
    double best[2] = {1e9, 1e9}; double tot[2] = {0, 0};
    const long block_rows = 16384 / (C * 4) * 4;  // 64 KB blocks
    for (int rep = 0; rep < 40; ++rep) {
      for (int mode = 0; mode < 2; ++mode) {
        auto t0 = clk::now();
        float s[2][64] = {};
#pragma omp parallel num_threads(2)
        {
          int t = omp_get_thread_num();
          long r0 = R * t / 2, r1 = R * (t + 1) / 2;
          float a[64] = {}, b[64] = {};
          for (long r = r0; r < r1; ++r)
            for (long c = 0; c < C; ++c) { float d = x[r * C + c]; a[c] += d; b[c] += d * d; }
          for (int c = 0; c < 64; ++c) s[t][c] = a[c] + b[c];
#pragma omp barrier
          long blocks = (r1 - r0 + block_rows - 1) / block_rows;
          for (long k = 0; k < blocks; ++k) {
            long kb = mode ? blocks - 1 - k : k;
            long b0 = r0 + kb * block_rows, b1 = std::min(r1, b0 + block_rows);
            for (long r = b0; r < b1; ++r)
              for (long c = 0; c < C; ++c) y[r * C + c] = x[r * C + c] * sc[c] + sh[c];
          }
        }
        double dt = std::chrono::duration<double, std::milli>(clk::now() - t0).count();
        if (rep >= 3) { best[mode] = std::min(best[mode], dt); tot[mode] += dt; }
        if (s[0][0] == 12345) printf("x");
      }
    }
    printf("%3ld MB fwd order best %.3f ms mean %.3f | reverse best %.3f mean %.3f | ratio mean %.3f\n", mb, best[0], tot[0] / 37, best[1], tot[1] / 37, tot[0] / tot[1]);
    free(x); free(y);
  }
}
