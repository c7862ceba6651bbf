import sys, time, torch
from triton_bn.bench import heap, cases
heap.keep_freed_memory(); torch.set_num_threads(2)
w = cases.build('train_fwdbwd', sys.argv[1], (2,512,28,28), torch.float32, 'channels_last', 'cpu').run
for _ in range(30): w()
v=[]
for _ in range(int(sys.argv[2])):
    s=time.perf_counter(); w(); v.append(time.perf_counter()-s)
v.sort(); print(sys.argv[1], "median %.1f us" % (v[len(v)//2]*1e6))
