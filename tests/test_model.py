"""The network: presets, objectives, the sos shift, features, files."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import random_model
from igpt import IgptError
from igpt.model import PRESETS, ImageGPT, ImageGPTConfig, num_params
from igpt.ops import RMSNorm, RMSNormFunction, quick_gelu

PAPER_PARAMS = {"igpt-s": 76e6, "igpt-m": 455e6, "igpt-l": 1362e6, "igpt-xl": 6801e6}


@pytest.mark.parametrize("name", PAPER_PARAMS)
def test_preset_sizes_match_the_paper(name):
    config = ImageGPTConfig.from_preset(name, vocab_size=512, n_ctx=1024)
    assert abs(num_params(config) / PAPER_PARAMS[name] - 1) < 0.01


@pytest.mark.parametrize("overrides", [{}, {"bias": True}, {"n_classes": 10}])
def test_parameter_formula_counts_real_models(overrides):
    config = ImageGPTConfig.from_preset("tiny", vocab_size=17, n_ctx=64, **overrides)
    assert num_params(config) == sum(p.numel() for p in ImageGPT(config).parameters())


def test_presets_and_overrides():
    assert set(PRESETS) >= {"tiny", "mini", "igpt-s", "igpt-m", "igpt-l", "igpt-xl"}
    config = ImageGPTConfig.from_preset("mini", n_layer=2, vocab_size=9, n_ctx=16)
    assert (config.n_layer, config.n_embd, config.vocab_size) == (2, 256, 9)
    with pytest.raises(IgptError, match="unknown model preset 'huge'.*tiny"):
        ImageGPTConfig.from_preset("huge")
    with pytest.raises(IgptError, match="multiple of n_head"):
        ImageGPTConfig(n_embd=30, n_head=4)


def test_released_initialisation():
    torch.manual_seed(0)
    d, layers = 256, 8
    model = ImageGPT(ImageGPTConfig(vocab_size=512, n_ctx=256, n_embd=d, n_layer=layers, n_head=8))
    block = model.blocks[0]
    expected = {
        "q": (block.attn.q.weight, 1 / math.sqrt(d)), "proj": (block.attn.proj.weight, 1 / math.sqrt(d * layers)),
        "fc": (block.mlp.fc.weight, 0.02), "wte": (model.wte.weight, 0.02), "wpe": (model.wpe, 0.01),
    }
    for name, (tensor, std) in expected.items():
        assert tensor.std().item() == pytest.approx(std, rel=0.1), name
    assert not model.head.weight.any() and torch.equal(block.ln_1.weight, torch.ones(d))
    assert not any(isinstance(m, torch.nn.Dropout) for m in model.modules())
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())


def test_norm_is_gain_only_rms_and_activation_is_quick_gelu():
    model = random_model()
    x = torch.randn(2, 5, 32)
    norm = model.blocks[0].ln_1
    expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected)
    fc = model.blocks[0].mlp
    torch.testing.assert_close(fc(x), fc.proj(fc.fc(x) * torch.sigmoid(1.702 * fc.fc(x))))


def test_quick_gelu_gradient_matches_the_formula():
    x = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    assert type(quick_gelu(x).grad_fn).__name__ == "QuickGELUFunctionBackward"  # its own backward runs
    assert torch.autograd.gradcheck(quick_gelu, (x,))
    y = torch.randn(3, 40, requires_grad=True)
    formula = torch.autograd.grad((y * torch.sigmoid(1.702 * y)).sum(), y)[0]
    torch.testing.assert_close(torch.autograd.grad(quick_gelu(y).sum(), y)[0], formula)


def test_rms_norm_gradient_matches_pytorchs_and_its_forward_is_the_same_bits():
    norm = RMSNorm(9, eps=1e-5).double()
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(2, 6, 9, dtype=torch.float64, requires_grad=True)
    assert type(norm(x).grad_fn).__name__ == "RMSNormFunctionBackward"  # its own backward runs
    assert torch.autograd.gradcheck(lambda x, w: RMSNormFunction.apply(x, w, 1e-5), (x, norm.weight))
    reference = torch.nn.RMSNorm(9, eps=1e-5).float()
    y = torch.randn(4, 40, 9, requires_grad=True)
    with torch.no_grad():
        reference.weight.copy_(norm.weight)
    ours = RMSNorm(9, eps=1e-5)
    ours.load_state_dict(reference.state_dict())
    assert torch.equal(ours(y), reference(y))
    g = torch.randn(4, 40, 9)
    grads = [torch.autograd.grad(module(y), (y, module.weight), g) for module in (ours, reference)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_ar_logits_at_i_depend_only_on_pixels_before_i():
    model = random_model()
    tokens = torch.randint(0, 13, (2, 25))
    changed = tokens.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 13
    a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :11], b[:, :11])  # logits[:, 10] predicts pixel 10 without seeing it
    assert (a[:, 11:] - b[:, 11:]).abs().max() > 1e-4


def test_ar_loss_is_next_pixel_nll_over_all_positions():
    model = random_model()
    tokens = torch.randint(0, 13, (3, 25))
    expected = F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
    torch.testing.assert_close(model.loss(tokens), expected)


def test_bert_zeroes_masked_embeddings_and_scores_only_them():
    model = random_model("bert")
    tokens = torch.randint(0, 13, (2, 25))
    mask = torch.zeros(2, 25, dtype=torch.bool)
    mask[:, 3] = True
    other = tokens.clone()
    other[:, 3] = (other[:, 3] + 5) % 13
    torch.testing.assert_close(model(tokens, mask), model(other, mask))  # a masked token's value is invisible
    assert (model(tokens) - model(other)).abs().max() > 1e-4  # bidirectional: everything sees pixel 3
    gen = torch.Generator().manual_seed(0)
    loss = model.loss(tokens, generator=gen)
    drawn = torch.rand(tokens.shape, generator=torch.Generator().manual_seed(0)) < 0.15
    expected = F.cross_entropy(model(tokens, drawn)[drawn], tokens[drawn])
    torch.testing.assert_close(loss, expected)


def test_features_are_the_normalised_residual_stream_from_one_pass():
    model = random_model()
    tokens = torch.randint(0, 13, (2, 25))
    seen = []
    hooks = [b.ln_1.register_forward_hook(lambda m, i, o: seen.append(o.mean(1))) for b in model.blocks]
    model(tokens)
    for h in hooks:
        h.remove()
    feats = model.features(tokens, [0, 2, 3])
    torch.testing.assert_close(feats[0], seen[0])
    torch.testing.assert_close(feats[2], seen[2])
    torch.testing.assert_close(feats[3], model.hidden(tokens).mean(1))
    with pytest.raises(IgptError, match="0..3"):
        model.features(tokens, [4])


def test_grid_features_are_the_cell_means_of_the_image():
    from igpt.probe import check_pool_grid, pool_positions

    model = random_model()  # 5x5 image: a 2x2 grid has cells of 3 and 2 rows and columns
    tokens = torch.randint(0, 13, (2, 25))
    normed = model.blocks[1].ln_1(model.blocks[0](model.embed(tokens))).detach()
    image = normed.reshape(2, 5, 5, -1)
    cells = [image[:, rows, cols].mean((1, 2)) for rows in (slice(0, 3), slice(2, 5)) for cols in (slice(0, 3), slice(2, 5))]
    grid = model.features(tokens, [1], pool=lambda x: pool_positions(x, 2))[1]
    assert grid.shape == (2, 4 * model.config.n_embd)
    torch.testing.assert_close(grid.reshape(2, -1, 4).permute(0, 2, 1), torch.stack(cells, 1))
    whole = model.features(tokens, [1], pool=lambda x: pool_positions(x, 5))[1].reshape(2, -1, 25).mean(2)
    torch.testing.assert_close(whole, model.features(tokens, [1])[1])
    for bad in (0, 6):
        with pytest.raises(IgptError, match="--pool-grid must lie in 1..5"):
            check_pool_grid(model.config, bad)


def test_bf16_autocast_and_compile():
    model = random_model()
    tokens = torch.randint(0, 13, (2, 25))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(tokens)
    assert low.dtype == torch.bfloat16
    assert (low.float() - model(tokens)).abs().max() < 0.1
    compiled = torch.compile(model)
    torch.testing.assert_close(compiled(tokens), model(tokens), atol=1e-4, rtol=1e-4)


def test_compiled_training_gradients_equal_eager_for_a_local_model():
    """`igpt train --compile` traces quick_gelu's own backward and the band's blocks."""
    torch.manual_seed(0)
    model = ImageGPT(ImageGPTConfig(vocab_size=13, n_ctx=36, n_layer=2, n_embd=32, n_head=2, positions="2d",
                                    attention="local", window_rows=2))
    tokens = torch.randint(0, 13, (2, 36))

    def gradients(net):
        model.zero_grad()
        net(tokens).square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    for eager, compiled in zip(gradients(model), gradients(torch.compile(model, fullgraph=True))):  # no eager fallback
        torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-4)


def test_save_and_load_pretrained(tmp_path):
    model = random_model(n_classes=3)
    model.save_pretrained(tmp_path)
    again = ImageGPT.from_pretrained(tmp_path)
    assert again.config == model.config
    tokens = torch.randint(0, 13, (2, 25))
    torch.testing.assert_close(again(tokens), model(tokens))
    assert not list(tmp_path.glob(".*tmp*"))


def test_bad_model_folders(tmp_path):
    with pytest.raises(IgptError, match="not a folder"):
        ImageGPT.from_pretrained(tmp_path / "nope")
    with pytest.raises(IgptError, match="needs config.json and model.safetensors"):
        ImageGPT.from_pretrained(tmp_path)
    random_model().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(IgptError, match="damaged or truncated"):
        ImageGPT.from_pretrained(tmp_path)
    random_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_embd": 64}))
    with pytest.raises(IgptError, match="does not match"):
        ImageGPT.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "future_field": 1}))
    with pytest.raises(IgptError, match="unknown model configuration fields: future_field"):
        ImageGPT.from_pretrained(tmp_path)


def test_every_preset_builds_on_the_meta_device_with_the_formula_count():
    for name in PRESETS:
        config = ImageGPTConfig.from_preset(name, vocab_size=512, n_ctx=1024)
        with torch.device("meta"):
            model = ImageGPT(config)
        assert sum(p.numel() for p in model.parameters()) == num_params(config), name


def test_configuration_fields_are_checked():
    with pytest.raises(IgptError, match="unknown model configuration fields: depth"):
        ImageGPTConfig.from_preset("tiny", depth=3)
    with pytest.raises(IgptError, match="n_layer must be int, got '4'"):
        ImageGPTConfig(n_layer="4")
    with pytest.raises(IgptError, match="bias must be bool"):
        ImageGPTConfig(bias=1)
    with pytest.raises(IgptError, match="objective must be 'ar' or 'bert'"):
        ImageGPTConfig(objective="mlm")
    saved = ImageGPTConfig().to_dict()
    assert ImageGPTConfig.from_dict(saved) == ImageGPTConfig()
    del saved["n_head"]
    with pytest.raises(IgptError, match="lacks fields: n_head"):
        ImageGPTConfig.from_dict(saved)


def test_bert_loss_takes_a_given_mask_and_stays_finite_when_nothing_is_masked():
    model = random_model("bert")
    tokens = torch.randint(0, 13, (2, 25))
    mask = torch.zeros(2, 25, dtype=torch.bool)
    mask[0, 4] = mask[1, 20] = True
    expected = F.cross_entropy(model(tokens, mask)[mask], tokens[mask])
    torch.testing.assert_close(model.loss(tokens, mask=mask), expected)
    empty = model.loss(tokens, mask=torch.zeros_like(mask))
    empty.backward()
    assert empty.item() == 0 and all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_the_folder_palette_must_match_the_vocabulary(tmp_path):
    import numpy as np

    from igpt.palette import Palette

    model = random_model()
    right = Palette(np.linspace(-1, 1, 13 * 3, dtype=np.float32).reshape(13, 3))
    model.save_pretrained(tmp_path, palette=right)
    assert Palette.load(tmp_path / "palette.npy") == right
    ImageGPT.from_pretrained(tmp_path)
    wrong = Palette(np.zeros((5, 3), dtype=np.float32))
    with pytest.raises(IgptError, match="palette has 5 colours but the model's vocabulary is 13"):
        ImageGPT.from_pretrained(tmp_path, palette=wrong)
    wrong.save(tmp_path / "palette.npy")
    with pytest.raises(IgptError, match="palette has 5 colours but the model's vocabulary is 13"):
        ImageGPT.from_pretrained(tmp_path)
    with pytest.raises(IgptError, match="palette has 5 colours"):
        model.save_pretrained(tmp_path / "other", palette=wrong)
    assert not (tmp_path / "other").exists()
