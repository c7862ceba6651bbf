# ours vs eager interleaved call by call in one process: median ratio per row (bench workloads)
import sys, time, torch, statistics
from triton_bn.bench import heap, cases
heap.keep_freed_memory()
torch.set_num_threads(2)
label = sys.argv[1]
rows = [(c, s, d) for c in sys.argv[2].split(',') for d in sys.argv[4].split(',') for s in sys.argv[3].split(',')]
dt = {'fp16': torch.float16, 'bf16': torch.bfloat16, 'fp32': torch.float32}
out = []
for case, shape, d in rows:
    shp = tuple(map(int, shape.split('x')))
    w = {p: cases.build(case, p, shp, dt[d], 'channels_last', 'cpu').run for p in ('eager_native', 'triton_bn')}
    for p in w: w[p](); w[p]()
    ratios = []
    for _ in range(40):
        t = {}
        for p in ('eager_native', 'triton_bn'):
            s = time.perf_counter(); w[p](); t[p] = time.perf_counter() - s
        ratios.append(t['eager_native'] / t['triton_bn'])
    out.append('%s %s %s %s %.3f' % (label, case, shape, d, statistics.median(ratios)))
print('\n'.join(out))
