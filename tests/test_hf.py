"""Hugging Face interop with transformers as the oracle: logits agree in both directions."""

import json

import numpy as np
import pytest
import torch

from igpt import IgptError
from igpt.hf import from_hf, to_hf
from igpt.model import ImageGPT, ImageGPTConfig
from igpt.palette import Palette

transformers = pytest.importorskip("transformers")

CONFIGS = [  # (n_embd, n_head, n_layer, side, palette size, non-zero biases)
    (32, 2, 1, 4, 16, False),
    (48, 3, 2, 5, 33, True),
    (64, 4, 3, 6, 512, True),
    (96, 1, 2, 3, 7, False),
]


def hf_model(d, heads, layers, side, vocab, biased, seed):
    config = transformers.ImageGPTConfig(vocab_size=vocab + 1, n_positions=side * side, n_embd=d, n_layer=layers,
                                         n_head=heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.ImageGPTForCausalImageModeling(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") and not biased:
                p.zero_()
            elif "ln" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return model


def hf_logits(model, tokens: torch.Tensor, sos: int) -> torch.Tensor:
    ids = torch.cat([torch.full((len(tokens), 1), sos), tokens[:, :-1]], dim=1)
    with torch.no_grad():
        return model(input_ids=ids).logits


def random_palette(k, seed=0):
    return Palette(np.random.default_rng(seed).uniform(-1, 1, (k, 3)).astype(np.float32))


@pytest.mark.parametrize("d, heads, layers, side, vocab, biased", CONFIGS)
def test_import_matches_hugging_face_logits(tmp_path, d, heads, layers, side, vocab, biased):
    theirs = hf_model(d, heads, layers, side, vocab, biased, seed=d + layers)
    theirs.save_pretrained(tmp_path)
    random_palette(vocab).save_hf(tmp_path, resolution=side)
    ours, palette = from_hf(tmp_path)
    assert ours.config.bias == biased and palette.size == vocab
    tokens = torch.randint(0, vocab, (3, side * side), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(tokens) - hf_logits(theirs, tokens, sos=vocab)).abs().max().item()
    assert diff < 1e-4


@pytest.mark.parametrize("d, heads, layers, side, vocab, biased", CONFIGS)
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, d, heads, layers, side, vocab, biased):
    ours = ImageGPT(ImageGPTConfig(vocab_size=vocab, n_ctx=side * side, n_embd=d, n_layer=layers, n_head=heads,
                                   bias=biased))
    gen = torch.Generator().manual_seed(layers)
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=gen) + (1 if p.ndim == 1 and not biased else 0))
    palette = random_palette(vocab, seed=3)
    to_hf(ours, palette, tmp_path)
    theirs = transformers.ImageGPTForCausalImageModeling.from_pretrained(tmp_path).eval()
    processor = transformers.ImageGPTImageProcessor.from_pretrained(tmp_path)
    np.testing.assert_array_equal(np.asarray(processor.clusters, dtype=np.float32), palette.centers)
    tokens = torch.randint(0, vocab, (2, side * side), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (ours(tokens) - hf_logits(theirs, tokens, sos=vocab)).abs().max().item()
    assert diff < 1e-4
    again, _ = from_hf(tmp_path)  # and back: the round trip is exact
    for (name, a), b in zip(ours.state_dict().items(), again.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_zero_biases_are_dropped_and_released_palette_comes_along(tmp_path):
    hf_model(32, 2, 1, 4, 16, False, seed=0).save_pretrained(tmp_path)
    model, palette = from_hf(tmp_path)
    assert not model.config.bias and not any(k.endswith(".bias") for k in model.state_dict())
    assert palette is None


def test_convert_command_both_ways(tmp_path):
    from igpt.cli import main

    hf_dir = tmp_path / "hf"
    hf_model(32, 2, 2, 4, 16, True, seed=5).save_pretrained(hf_dir)
    random_palette(16).save_hf(hf_dir, resolution=4)
    assert main(["convert", "--from-hf", str(hf_dir), "--out", str(tmp_path / "igpt")]) == 0
    model = ImageGPT.from_pretrained(tmp_path / "igpt")
    assert Palette.load(tmp_path / "igpt" / "palette.npy").size == 16 and model.config.bias
    assert main(["convert", "--to-hf", str(tmp_path / "igpt"), "--out", str(tmp_path / "back")]) == 0
    assert json.loads((tmp_path / "back" / "config.json").read_text())["vocab_size"] == 17
    assert main(["convert", "--to-hf", str(tmp_path / "igpt"), "--out", str(tmp_path / "back")]) == 1


def test_bad_inputs_give_one_clear_error(tmp_path, capsys):
    from igpt.cli import main

    with pytest.raises(IgptError, match="no config.json"):
        from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(IgptError, match="not a Hugging Face ImageGPT"):
        from_hf(tmp_path)
    good = tmp_path / "good"
    hf_model(32, 2, 1, 4, 16, False, seed=0).save_pretrained(good)
    weights = good / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(IgptError, match="damaged, truncated"):
        from_hf(good)
    capsys.readouterr()
    assert main(["convert", "--from-hf", str(tmp_path / "missing" / "x" / "y"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("igpt: error:")
