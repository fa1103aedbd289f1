import torch, time
torch.manual_seed(0)
def best(f, n=20):
    f(); ts=[]
    for _ in range(n):
        t=time.perf_counter(); f(); ts.append(time.perf_counter()-t)
    return min(ts)
a=torch.randn(2048,2048); b=torch.randn(2048,2048)
t=best(lambda: a@b, 10); peak=2*2048**3/t/1e9; print(f"peak 2048^3: {peak:.1f} GFLOP/s")
T=4096
shapes=[("qkv fwd",T,128,384),("proj fwd",T,128,128),("fc fwd",T,128,512),("mlp proj fwd",T,512,128),("head fwd",T,128,512),
("qkv dX",T,384,128),("proj dX",T,128,128),("fc dX",T,512,128),("mlpproj dX",T,128,512),("head dX",T,512,128),
("qkv dW",384,T,128),("proj dW",128,T,128),("fc dW",512,T,128),("mlpproj dW",128,T,512),("head dW",512,T,128)]
tot=0; fl=0
for name,m,k,n in shapes:
    x=torch.randn(m,k); w=torch.randn(k,n)
    if "dW" in name: x=torch.randn(k,m).t()  # transposed as in backward
    tt=best(lambda: x@w); f=2*m*k*n
    mult = 1 if "head" in name else 4
    tot+=tt*mult; fl+=f*mult
    print(f"{name:14s} {m}x{k}x{n}: {tt*1e3:.3f} ms {f/tt/1e9:.1f} GFLOP/s")
print(f"sum per step {tot*1e3:.1f} ms, {fl/tot/1e9:.1f} GFLOP/s ({fl/1e9:.2f} GFLOP)")
