import sys, time, torch
from triton_bn import dispatch
torch.set_num_threads(2)
res = []
for dtype in (torch.float16, torch.bfloat16):
  for shape in [(32, 64, 56, 56), (16, 64, 28, 28), (2, 64, 112, 112)]:
    g = torch.Generator().manual_seed(0)
    x, gy = ((torch.randn(shape, generator=g)).to(dtype).contiguous(memory_format=torch.channels_last) for _ in range(2))
    C = shape[1]; w = torch.rand(C, generator=g) + 0.5; b = torch.randn(C, generator=g)
    _, mean, invstd = dispatch.NATIVE.training(x, None, None, None, w, b, None, 0.1, False, 1e-5, 0, 0.0)
    f = lambda: dispatch.NATIVE.backward(gy, x, mean, invstd, None, w, b, None, 1e-5, 0, 0.0, [False, True, True, False])
    fx = lambda: dispatch.NATIVE.backward(gy, x, mean, invstd, None, w, b, None, 1e-5, 0, 0.0, [True, True, True, False])
    for fn, what in ((f, 'sums'), (fx, 'sums+dx')):
        for _ in range(5): fn()
        ts = []
        for _ in range(60):
            s = time.perf_counter(); fn(); ts.append(time.perf_counter() - s)
        ts.sort()
        res.append('%s %s %s p20 %.3f ms median %.3f' % (str(dtype)[6:], 'x'.join(map(str, shape)), what, ts[12] * 1e3, ts[30] * 1e3))
print(sys.argv[1]); print('\n'.join(res))
