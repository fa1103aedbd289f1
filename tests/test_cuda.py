"""CUDA against CPU: the same weights give the same logits, gradients and greedy images on both, and
the compiled decoding step (CUDA graphs) draws what the eager one does. Every test skips without a GPU;
bench/gpu_check.py runs them with `pytest -m cuda` on a GPU machine."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import random_model

from igpt.model import ImageGPT
from igpt.sample import sample

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: torch.cuda.is_available() is False"),
]

CLEAR_MARGIN = 5e-3  # top-1 minus top-2 logit at every greedy pick: far above fp32 differences between kernels


def random_tokens(model: ImageGPT, rows: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (rows, length), generator=torch.Generator().manual_seed(seed))


def side(model: ImageGPT) -> int:
    return round(model.config.n_ctx**0.5)


@pytest.fixture(autouse=True)
def full_fp32_matmuls():
    """fp32 means fp32 here: TF32 matrix products would differ from the CPU's by ~1e-3."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(previous)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, rel: float = 1e-4) -> None:
    """Equal to `rel` of the largest magnitude: summation order differs between CPU and CUDA kernels."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual.cpu(), expected, rtol=rel, atol=rel * scale, msg=lambda m: f"{what}: {m}")


def assert_clear_greedy_picks(model: ImageGPT, images: torch.Tensor, prefix: torch.Tensor | None) -> None:
    """No near-ties among the greedy picks, else rounding alone could choose another pixel (the prefixes
    here are chosen so there are none)."""
    with torch.no_grad():
        top2 = model(images).topk(2, dim=-1).values
    picked = slice(0 if prefix is None else prefix.shape[1], None)
    margin = (top2[:, picked, 0] - top2[:, picked, 1]).min().item()
    assert margin > CLEAR_MARGIN, f"a near-tie ({margin:.1e}) among the greedy picks: choose another prefix"


PATTERNS = {"dense": {}, "local": dict(attention="local", window_rows=2, positions="2d"),
            "strided": dict(attention="strided", positions="2d")}


@pytest.mark.parametrize("pattern", PATTERNS)
def test_logits_and_gradients_on_cuda_match_the_cpu(pattern):
    """fp32: the blocked kernels on both devices (FlexAttention serves bf16 training: the next test)."""
    cpu = random_model(n_head=2, **PATTERNS[pattern])
    cuda = copy.deepcopy(cpu).cuda()
    tokens = random_tokens(cpu, 3, cpu.config.n_ctx, seed=1)
    logits = {}
    for name, model in (("cpu", cpu), ("cuda", cuda)):
        x = tokens.to(next(model.parameters()).device)
        logits[name] = model(x)
        F.cross_entropy(logits[name].flatten(0, 1), x.flatten()).backward()
    assert_close(logits["cuda"].detach(), logits["cpu"].detach(), "logits")

    for (name, on_cpu), on_cuda in zip(cpu.named_parameters(), cuda.parameters()):
        assert_close(on_cuda.grad, on_cpu.grad, f"gradient of {name}", rel=5e-4)


@pytest.mark.parametrize("pattern", ["local", "strided"])
def test_bf16_training_runs_band_layers_through_flex_attention(pattern):
    """Under bf16 autocast, band layers take FlexAttention on CUDA; logits and gradients match the blocked
    kernels' (the same model with FlexAttention turned off) to bf16's precision."""
    from igpt.attention import backends as model_module

    torch.manual_seed(0)
    model = random_model(n_head=2, **PATTERNS[pattern]).cuda().train()
    tokens = random_tokens(model, 4, model.config.n_ctx, seed=3).cuda()
    assert model_module.flex_band_applies(torch.zeros(1, 1, 1, 16, device="cuda", dtype=torch.bfloat16))
    results = {}
    for route in ("flex", "blocked"):
        model.zero_grad()
        with pytest.MonkeyPatch.context() as patch:
            if route == "blocked":
                patch.setattr(model_module, "flex_band_applies", lambda q: False)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(tokens)
                F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten()).backward()
        results[route] = (logits.float().detach(), [p.grad.clone() for p in model.parameters()])
    assert_close(results["flex"][0], results["blocked"][0].cpu(), "logits", rel=3e-2)
    for flex_grad, blocked_grad in zip(results["flex"][1], results["blocked"][1]):
        assert_close(flex_grad, blocked_grad.cpu(), "gradient", rel=1e-1)


@pytest.mark.parametrize("prefix_rows", [0, 1])
def test_greedy_sampling_on_cuda_equals_the_cpu(prefix_rows):
    cpu = random_model()
    prefix = random_tokens(cpu, 4, prefix_rows * side(cpu), seed=12) if prefix_rows else None
    expected = sample(cpu, 4, prefix, greedy=True)
    assert_clear_greedy_picks(cpu, expected, prefix)
    on_cuda = sample(copy.deepcopy(cpu).cuda(), 4, prefix, greedy=True)
    assert on_cuda.is_cuda
    torch.testing.assert_close(on_cuda.cpu(), expected, rtol=0, atol=0)


def test_compiled_decoding_with_cuda_graphs_equals_eager():
    model = random_model().cuda()
    prefix = random_tokens(model, 2, side(model), seed=5).cuda()
    for rows in (None, prefix):
        eager = sample(model, 2, rows, greedy=True)
        assert_clear_greedy_picks(model, eager, rows)
        torch.testing.assert_close(sample(model, 2, rows, greedy=True, compile=True), eager, rtol=0, atol=0)
    draws = [sample(model, 2, generator=torch.Generator("cuda").manual_seed(6), compile=compiled)
             for compiled in (True, False)]  # the draws happen outside the graph, from the same generator
    torch.testing.assert_close(draws[0], draws[1], rtol=0, atol=0)


def test_compiled_decoding_runs_under_bf16_autocast():
    model = random_model().cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        images = sample(model, 3, generator=torch.Generator("cuda").manual_seed(8), compile=True)
        again = sample(model, 3, generator=torch.Generator("cuda").manual_seed(8), compile=True)
    assert images.shape == (3, model.config.n_ctx) and images.dtype == torch.long and images.is_cuda
    assert 0 <= int(images.min()) and int(images.max()) < model.config.vocab_size
    torch.testing.assert_close(again, images, rtol=0, atol=0)  # replaying the recorded graph reproduces the images
