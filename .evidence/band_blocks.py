import sys, torch
sys.path.insert(0, ".")
from common import seconds_per_call
from igpt.model import band_attention
torch.manual_seed(0)
b, h, side, hd = 1, 4, 64, 32
t = side * side
R = int(sys.argv[1]) if len(sys.argv) > 1 else 2
window = R * side
q, k, v = (torch.randn(b, h, t, hd, requires_grad=True) for _ in range(3))
g = torch.randn(b, h, t, hd)
ref = band_attention(q, k, v, window, side)
def fb(block):
    def run():
        q.grad = k.grad = v.grad = None
        band_attention(q, k, v, window, block).backward(g)
    return run
for block in (16, 32, 64, 128):
    assert (band_attention(q, k, v, window, block) - ref).abs().max() < 1e-5
for rep in range(2):
    for block in (16, 32, 64, 128):
        print(block, round(1000 * seconds_per_call(fb(block)), 2), "ms", flush=True)
