"""Band attention via explicit bmm + masked softmax (eager and compiled) vs igpt's blocked flash SDPA."""
import sys, torch, torch.nn.functional as F
sys.path.insert(0, ".")
from common import seconds_per_call
from igpt.model import band_attention
torch.manual_seed(0)
b, h, side, hd, R = 1, 4, 64, 32, 2
t = side * side
window, block = R * side, side
def math_band(q, k, v):
    before, blocks = window // block, t // block
    def windows(x):
        x = F.pad(x, (0, 0, before * block, 0)).reshape(b * h, before + blocks, block, hd)
        return torch.cat([x[:, i : i + blocks] for i in range(before + 1)], dim=2)
    query = torch.arange(blocks * block).view(blocks, block, 1)
    key = ((torch.arange(blocks) - before) * block).view(blocks, 1, 1) + torch.arange((before + 1) * block)
    mask = ((key >= 0) & (key <= query) & (key > query - window))
    qs = q.reshape(b * h, blocks, block, hd) * hd ** -0.5
    s = qs @ windows(k).transpose(-1, -2)
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, -1)
    return (p @ windows(v)).reshape(b, h, t, hd)
q, k, v = (torch.randn(b, h, t, hd, requires_grad=True) for _ in range(3))
g = torch.randn(b, h, t, hd)
ref = band_attention(q, k, v, window, block)
out = math_band(q, k, v)
print("max diff", (ref - out).abs().max().item())
comp = torch.compile(math_band)
comp(q,k,v)
def fb(fn):
    def run():
        q.grad = k.grad = v.grad = None
        fn(q, k, v).backward(g)
    return run
for name, fn in [("flash band", lambda q,k,v: band_attention(q,k,v,window,block)), ("math eager", math_band), ("math compiled", comp),
                 ("flash band", lambda q,k,v: band_attention(q,k,v,window,block)), ("math eager", math_band), ("math compiled", comp)]:
    print(name, round(1000 * seconds_per_call(fb(fn)), 2), "ms")
