"""igpt's C++ band kernel (igpt/attention/band_kernel.py): exact against dense attention under the band's mask,
in float32 and bfloat16, chosen by band_attention on a CPU, and called from compiled graphs. How it is built,
and what happens where it cannot be: tests/test_kernels.py."""

import copy

import pytest
import torch
import torch.nn.functional as F

from igpt.attention import band_kernel
from conftest import band_mask, masked_dense, qkv_outputs_and_gradients
from igpt.attention import band_attention
from igpt.model import ImageGPT, ImageGPTConfig

needs_kernel = pytest.mark.skipif(not band_kernel.available(), reason="no C++ compiler builds igpt's band kernel here")


def from_the_kernel(out: torch.Tensor) -> bool:
    return "igpt_band_forward" in out.grad_fn.name()


SUBNORMAL = torch.tensor([1e-39])  # made under gradual underflow, before any kernel call


def trainable_band_model(attention: str) -> ImageGPT:
    """A 16x16 model whose head is not zero (zero-initialised, it would stop every other gradient)."""
    torch.manual_seed(0)
    model = ImageGPT(ImageGPTConfig(vocab_size=16, n_ctx=256, n_embd=64, n_layer=2, n_head=2, positions="2d",
                                    attention=attention, window_rows=2))
    torch.nn.init.normal_(model.head.weight, std=0.02)
    return model


@needs_kernel
@pytest.mark.parametrize("b, h, t, hd, window", [(1, 4, 256, 32, 32), (2, 3, 100, 16, 20), (3, 1, 50, 32, 7),
                                                 (1, 2, 37, 64, 64), (2, 2, 70, 128, 33), (1, 1, 5, 16, 1),
                                                 (2, 2, 40, 48, 17), (1, 2, 33, 96, 40)])
@pytest.mark.parametrize("layout", ["model", "contiguous", "every other"])
def test_the_kernel_equals_masked_dense_attention_forward_and_backward(b, h, t, hd, window, layout):
    """float32 against float64 SDPA with the band's full mask: whole and ragged tiles, windows
    narrower than a tile, wider than the sequence (clamped to it), one position; every head size
    it takes; q, k and v as the model makes them (strided views of one product), contiguous, or
    with head_dim at stride 2."""
    torch.manual_seed(0)
    qkv = torch.randn(b, t, 3 * h * hd)
    grad = torch.randn(b, h, t, hd)
    ours = qkv_outputs_and_gradients(lambda q, k, v: band_kernel.band_attention(q, k, v, window), qkv, grad, h, layout)
    dense = qkv_outputs_and_gradients(lambda q, k, v: masked_dense(q, k, v, window), qkv.double(), grad.double(), h,
                                      layout)
    for got, want in zip(ours, dense):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("b, h, t, hd, window", [(2, 3, 100, 48, 20), (1, 2, 70, 64, 70), (2, 2, 37, 32, 9)])
def test_bfloat16_in_and_out_is_as_close_as_pytorchs_own(b, h, t, hd, window):
    """bf16 q, k, v in, bf16 out and gradients. Against float64 on the same bf16 values the error is the
    rounding of results to bf16, in the gradients of the output that the backward reads back (flash
    attention's dO . O) and, on a CPU with AVX512-BF16, of the probabilities and the scores' gradients
    before their products (as PyTorch's bf16 kernel rounds them): within half a bf16 ulp of the largest
    value (2**-8 of it), and on average within 5% of PyTorch's own bf16 attention on the same inputs (both
    round the same values; their sums run in other orders, and PyTorch's kernel differs between CPUs)."""
    torch.manual_seed(0)
    qkv = torch.randn(b, t, 3 * h * hd).bfloat16()
    grad = torch.randn(b, h, t, hd).bfloat16()
    ours = qkv_outputs_and_gradients(lambda q, k, v: band_kernel.band_attention(q, k, v, window), qkv, grad, h)
    torch_bf16 = qkv_outputs_and_gradients(lambda q, k, v: masked_dense(q, k, v, window), qkv, grad, h)
    exact = qkv_outputs_and_gradients(lambda q, k, v: masked_dense(q, k, v, window), qkv.double(), grad.double(), h)
    for got, theirs, want in zip(ours, torch_bf16, exact):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.double(), want, atol=2**-8 * want.abs().max().item(), rtol=1.6e-2)
        assert (got.double() - want).abs().mean() <= 1.05 * (theirs.double() - want).abs().mean()


@needs_kernel
@pytest.mark.parametrize("window", [1, 6, 17, 20, 45])
@pytest.mark.parametrize("hd", band_kernel.HEAD_DIMS)
def test_bfloat16_at_every_head_size_and_window_edge(hd, window):
    """bf16 at every head size, batch > 1 and t = 45 (a ragged last tile), windows of one key, narrower than
    a tile, wider and the whole sequence; with an even window every tile's first key is odd (the bf16-dot
    path pairs keys from the even one before it). Output and the three gradients against float64 on the
    same bf16 values, within half a bf16 ulp of the largest value as above; the log-sum-exp, float sums of
    exact bf16 products, within float's rounding."""
    torch.manual_seed(0)
    b, h, t = 2, 2, 45
    qkv = torch.randn(b, t, 3 * h * hd).bfloat16()
    grad = torch.randn(b, h, t, hd).bfloat16()
    ours = qkv_outputs_and_gradients(lambda q, k, v: band_kernel.band_attention(q, k, v, window), qkv, grad, h)
    exact = qkv_outputs_and_gradients(lambda q, k, v: masked_dense(q, k, v, window), qkv.double(), grad.double(), h)
    for got, want in zip(ours, exact):
        torch.testing.assert_close(got.double(), want, atol=2**-8 * want.abs().max().item(), rtol=1.6e-2)
    q, k, v = qkv.view(b, t, 3, h, hd).permute(2, 0, 3, 1, 4)
    scores = q.double() @ k.double().transpose(-1, -2) / hd**0.5
    lse = scores.masked_fill(~band_mask(t, window), -torch.inf).logsumexp(-1)
    torch.testing.assert_close(torch.ops.igpt.band_forward(q, k, v, window)[1].double(), lse, atol=1e-5, rtol=1e-5)


@needs_kernel
def test_sharp_attention_stays_exact_and_leaves_the_callers_float_mode_alone():
    """Scores spread far wider than float's exponent range (as a trained model's are), where the kernel
    floors exp and flushes subnormals on its own threads: still dense attention under the mask, and
    the calling thread keeps gradual underflow afterwards (the flush is undone)."""
    torch.manual_seed(0)
    b, h, t, hd, window = 2, 2, 64, 32, 20
    qkv = torch.randn(b, t, 3 * h * hd)
    qkv[..., : h * hd] *= 40
    grad = torch.randn(b, h, t, hd)
    ours = qkv_outputs_and_gradients(lambda q, k, v: band_kernel.band_attention(q, k, v, window), qkv, grad, h)
    dense = qkv_outputs_and_gradients(lambda q, k, v: masked_dense(q, k, v, window), qkv.double(), grad.double(), h)
    for got, want in zip(ours, dense):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)
    assert (SUBNORMAL * 2).item() > 0 and SUBNORMAL.item() * 2 == (SUBNORMAL * 2).item()


@needs_kernel
def test_band_attention_runs_the_kernel_for_float32_and_splits_it_over_threads():
    """Every (batch, head) pair is computed alone, so one thread or two give the same bits, also
    for a pair count the threads do not divide, and both match dense attention under the mask;
    a summed output's gradient (expanded, stride 0) works."""
    q, k, v = (torch.randn(3, 1, 70, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    masked_dense(q, k, v, 20).sum().backward()
    reference = [x.grad for x in (q, k, v)]
    q, k, v = (x.detach().float().requires_grad_() for x in (q, k, v))
    out = band_attention(q, k, v, 20, 10)
    assert from_the_kernel(out)
    assert not from_the_kernel(band_attention(q.double(), k.double(), v.double(), 20, 10))
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            for x in (q, k, v):
                x.grad = None
            out = band_attention(q, k, v, 20, 10)
            out.sum().backward()
            results.append([out.detach(), q.grad, k.grad, v.grad])
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results):
        assert torch.equal(one, two)
    for ours, theirs in zip(results[0][1:], reference):
        torch.testing.assert_close(ours.double(), theirs, atol=1e-5, rtol=1e-5)


def test_the_kernel_refuses_what_it_cannot_read():
    """Checked before any memory is read: shapes, dtypes, the window; the log-sum-exp output
    carries no gradient (the backward does not compute one)."""
    q = torch.randn(1, 2, 20, 16)
    with pytest.raises(ValueError, match="one .* shape"):
        torch.ops.igpt.band_forward(q, q[:, :, :4], q, 5)
    with pytest.raises(ValueError, match="all float32 or all bfloat16"):
        torch.ops.igpt.band_forward(q.double(), q.double(), q.double(), 5)
    with pytest.raises(ValueError, match="all float32 or all bfloat16"):
        torch.ops.igpt.band_forward(q, q.bfloat16(), q, 5)
    for window in (0, 21):
        with pytest.raises(ValueError, match="window from 1 to t = 20"):
            torch.ops.igpt.band_forward(q, q, q, window)
    with pytest.raises(ValueError, match="at least one position"):
        band_kernel.band_attention(q, q, q, 0)
    if band_kernel.available():
        torch.testing.assert_close(band_kernel.band_attention(q, q, q, 2**40),
                                   F.scaled_dot_product_attention(q, q, q, is_causal=True), atol=1e-5, rtol=1e-5)
        out, lse = torch.ops.igpt.band_forward(q.requires_grad_(), q, q, 5)
        assert out.requires_grad and not lse.requires_grad


@needs_kernel
@pytest.mark.parametrize("attention", ["local", "strided"])
def test_a_training_step_is_the_same_with_and_without_the_kernel(attention, monkeypatch):
    """The whole model's loss and every parameter's gradient, the kernel against the blocked path."""
    model = trainable_band_model(attention)
    tokens = torch.randint(0, 16, (2, 256))
    results = []
    for kernel in (True, False):
        monkeypatch.setattr(band_kernel, "applies", lambda q, kernel=kernel: kernel)
        trained = copy.deepcopy(model)
        loss = trained.loss(tokens)
        loss.backward()
        results.append([loss.detach()] + [p.grad for p in trained.parameters()])
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


@needs_kernel
@pytest.mark.slow
def test_compiled_training_runs_the_kernel_and_equals_eager(monkeypatch):
    """torch.compile calls the kernel's operators as they are (no graph break, no fallback)."""
    model = trainable_band_model("local")
    tokens = torch.randint(0, 16, (2, 256))
    eager = copy.deepcopy(model)
    eager.loss(tokens).backward()
    calls = []
    call = band_kernel.call
    monkeypatch.setattr(band_kernel, "call", lambda function, *args: calls.append(function) or call(function, *args))
    torch._dynamo.reset()
    loss = torch.compile(model.loss, fullgraph=True)(tokens)
    loss.backward()
    library = band_kernel.KERNEL.library()
    assert calls == [library.band_forward] * 2 + [library.band_backward] * 2
    torch.testing.assert_close(loss, eager.loss(tokens), atol=1e-5, rtol=0)
    for ours, theirs in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-5, rtol=1e-4)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["dense", "column"])
def test_causal_dense_and_column_layers_run_in_the_kernel_exactly(kind, dtype):
    """A causal dense layer is the band as wide as the sequence; a column layer, one causal sequence per column and
    head: through the kernel, both equal float64 attention under the pattern's mask, outputs and gradients."""
    from igpt.attention import Pattern, attend

    torch.manual_seed(0)
    b, h, side, hd = 2, 3, 8, 32
    pattern = Pattern(kind, side)
    qkv = torch.randn(b, side * side, 3 * h * hd).to(dtype)
    grad = torch.randn(b, h, side * side, hd).to(dtype)
    ours = qkv_outputs_and_gradients(lambda q, k, v: attend(q, k, v, pattern, backend="band_kernel"), qkv, grad, h)
    mask = pattern.mask(side * side)
    exact = qkv_outputs_and_gradients(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                                      qkv.double(), grad.double(), h)
    for got, want in zip(ours, exact):
        assert got.dtype == dtype
        tolerance = 2**-8 * want.abs().max().item() if dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(got.double(), want, atol=tolerance, rtol=1.6e-2 if dtype == torch.bfloat16 else 1e-5)
