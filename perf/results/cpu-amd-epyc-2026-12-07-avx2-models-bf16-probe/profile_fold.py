import torch, copy, time, warnings
warnings.simplefilter('ignore')
import triton_bn
from triton_bn.bench import model as M
torch.set_num_threads(2)
builder, _, side, classes = M.MODELS['hf_mobilenet_v2']
torch.manual_seed(0)
base = builder().to(memory_format=torch.channels_last)
images = torch.randn(2, 3, side, side).contiguous(memory_format=torch.channels_last)
M.with_batch_statistics(base, images)
orig = copy.deepcopy(base).eval()
folded = triton_bn.fold_batch_norms(triton_bn.convert_model(copy.deepcopy(base)).eval())
from torch.profiler import profile, ProfilerActivity
for name, m in [('orig', orig), ('folded', folded)]*2:
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        m(images)
        s=time.perf_counter(); m(images); print(name, '%.1f ms'%((time.perf_counter()-s)*1e3))
for name, m in [('orig', orig), ('folded', folded)]:
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16), profile(activities=[ProfilerActivity.CPU]) as p:
        m(images)
    print(name); print(p.key_averages().table(sort_by='self_cpu_time_total', row_limit=12))
