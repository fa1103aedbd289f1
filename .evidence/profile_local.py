import sys, torch
from igpt.cli import reuse_freed_memory; reuse_freed_memory()
from torch.profiler import profile, ProfilerActivity
from igpt.model import ImageGPT, ImageGPTConfig
from igpt.batches import Batch
from igpt.distributed import World
from igpt.train import make_optimizer, train_step
att = sys.argv[1] if len(sys.argv) > 1 else "local"
torch.manual_seed(0)
cfg = ImageGPTConfig.from_preset("tiny", vocab_size=512, n_ctx=4096, positions="2d", attention=att, window_rows=2)
model = ImageGPT(cfg)
if len(sys.argv) > 2:
    import torch._inductor.config as ic; ic.cpp.enable_kernel_profile = True
    model = torch.compile(model)
opt = make_optimizer(model.parameters(), lr=1e-4)
batch = Batch(torch.randint(0, 512, (1, 4096)))
world = World(device=torch.device("cpu"))
for _ in range(3):
    train_step(model, opt, batch, world=world, precision="fp32")
import time
ts=[]
for _ in range(5):
    t=time.perf_counter(); train_step(model, opt, batch, world=world, precision="fp32"); ts.append(time.perf_counter()-t)
print("step ms", [round(1000*t,1) for t in ts])
with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(3):
        train_step(model, opt, batch, world=world, precision="fp32")
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
