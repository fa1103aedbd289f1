"""Hugging Face interop with transformers as the oracle: logits agree in both directions."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from igpt import IgptError
from igpt.hf import from_hf, to_hf
from igpt.model import ImageGPT, ImageGPTConfig
from igpt.palette import Palette

transformers = pytest.importorskip("transformers")
SHARED = Path(__file__).resolve().parents[1].parent / "shared"

CONFIGS = [  # (n_embd, n_head, n_layer, side, palette size, non-zero biases)
    (32, 2, 1, 4, 16, False),
    (48, 3, 2, 5, 33, True),
    (64, 4, 3, 6, 512, True),
    (96, 1, 2, 3, 7, False),
]


def randomise(model: torch.nn.Module, seed: int, biased: bool) -> None:
    """Every weight random (head and biases too), so agreement means every tensor is mapped right."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") and not biased:
                p.zero_()
            elif "ln" in name:  # norm gains near 1 keep the activations in a sensible range
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))


def hf_model(d, heads, layers, side, vocab, biased, seed):
    config = transformers.ImageGPTConfig(vocab_size=vocab + 1, n_positions=side * side, n_embd=d, n_layer=layers,
                                         n_head=heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.ImageGPTForCausalImageModeling(config).eval()
    randomise(model, seed, biased)
    return model


def logit_gap(ours: ImageGPT, theirs, tokens: torch.Tensor) -> float:
    """Max |difference| of the logits; Hugging Face takes [sos] + pixels[:-1], sos being its last id."""
    sos = ours.config.vocab_size
    ids = torch.cat([torch.full((len(tokens), 1), sos), tokens[:, :-1]], dim=1)
    with torch.no_grad():
        return (ours(tokens) - theirs(input_ids=ids).logits).abs().max().item()


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
    assert logit_gap(ours, theirs, tokens) < 1e-4


@pytest.mark.parametrize("d, heads, layers, side, vocab, biased", CONFIGS)
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, d, heads, layers, side, vocab, biased):
    ours = ImageGPT(ImageGPTConfig(vocab_size=vocab, n_ctx=side * side, n_embd=d, n_layer=layers, n_head=heads,
                                   bias=biased))
    randomise(ours, seed=layers, biased=biased)
    palette = random_palette(vocab, seed=3)
    to_hf(ours, palette, tmp_path)
    theirs = transformers.ImageGPTForCausalImageModeling.from_pretrained(tmp_path).eval()
    processor = transformers.ImageGPTImageProcessor.from_pretrained(tmp_path)
    np.testing.assert_array_equal(np.asarray(processor.clusters, dtype=np.float32), palette.centers)
    tokens = torch.randint(0, vocab, (2, side * side), generator=torch.Generator().manual_seed(2))
    assert logit_gap(ours, theirs, tokens) < 1e-4
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


def test_convert_with_the_released_palette_needs_no_network(tmp_path, monkeypatch):
    import socket

    from igpt.cli import main

    def offline(*args, **kwargs):
        raise OSError("no network in this test")

    monkeypatch.setattr(socket.socket, "connect", offline)
    hf_model(32, 2, 1, 4, 512, False, seed=0).save_pretrained(tmp_path / "hf")
    args = ["convert", "--from-hf", str(tmp_path / "hf"), "--palette", "openai", "--out", str(tmp_path / "igpt")]
    assert main(args) == 0
    assert Palette.load(tmp_path / "igpt") == Palette.openai()


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


def test_hub_ids_go_through_huggingface_hub(tmp_path, monkeypatch):
    import sys
    import types

    hf_model(32, 2, 1, 4, 16, False, seed=1).save_pretrained(tmp_path / "snap")
    random_palette(16).save_hf(tmp_path / "snap", resolution=4)
    asked = {}

    def snapshot_download(repo_id, allow_patterns):
        asked["repo"] = repo_id
        return str(tmp_path / "snap")

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=snapshot_download))
    model, palette = from_hf("openai/imagegpt-small")
    assert asked["repo"] == "openai/imagegpt-small" and palette.size == 16 and model.config.n_ctx == 16

    def offline(repo_id, allow_patterns):
        raise OSError("no network")

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=offline))
    with pytest.raises(IgptError, match="cannot fetch openai/imagegpt-small"):
        from_hf("openai/imagegpt-small")


def test_pytorch_model_bin_folders_import_too(tmp_path):
    theirs = hf_model(48, 3, 2, 5, 33, True, seed=7)
    theirs.config.save_pretrained(tmp_path)
    torch.save(theirs.state_dict(), tmp_path / "pytorch_model.bin")
    ours, palette = from_hf(tmp_path)
    assert palette is None and ours.config.bias
    assert logit_gap(ours, theirs, torch.randint(0, 33, (2, 25))) < 1e-4
    weights = tmp_path / "pytorch_model.bin"
    weights.write_bytes(weights.read_bytes()[:3000])
    with pytest.raises(IgptError, match="damaged, truncated"):
        from_hf(tmp_path)


def test_released_palette_survives_preprocessor_config_exactly(tmp_path):
    path = SHARED / "palettes" / "openai_kmeans_centers.npy"
    if not path.is_file():
        pytest.skip(f"the released palette is not at {path} (../shared is absent)")
    released = Palette.load(path)
    to_hf(ImageGPT(ImageGPTConfig(vocab_size=512, n_ctx=16, n_embd=32, n_layer=1, n_head=2)), released, tmp_path)
    _, again = from_hf(tmp_path)
    assert again.centers.dtype == np.float32 and again.hash == released.hash
    np.testing.assert_array_equal(again.centers, np.load(path))
    processor = transformers.ImageGPTImageProcessor.from_pretrained(tmp_path)
    np.testing.assert_array_equal(np.asarray(processor.clusters, dtype=np.float32), np.load(path))


def test_mismatched_palettes_and_unexportable_models_are_refused(tmp_path):
    hf_model(32, 2, 1, 4, 16, False, seed=0).save_pretrained(tmp_path / "hf")
    random_palette(10).save_hf(tmp_path / "hf", resolution=4)
    with pytest.raises(IgptError, match="palette has 10 colours but the model's vocabulary is 16"):
        from_hf(tmp_path / "hf")
    config = dict(vocab_size=16, n_embd=32, n_layer=1, n_head=2)
    with pytest.raises(IgptError, match="autoregressive only"):
        to_hf(ImageGPT(ImageGPTConfig(n_ctx=16, objective="bert", **config)), random_palette(16), tmp_path / "a")
    with pytest.raises(IgptError, match="not a square image"):
        to_hf(ImageGPT(ImageGPTConfig(n_ctx=12, **config)), random_palette(16), tmp_path / "b")
    with pytest.raises(IgptError, match="palette has 10 colours"):
        to_hf(ImageGPT(ImageGPTConfig(n_ctx=16, **config)), random_palette(10), tmp_path / "c")
    assert not any((tmp_path / name).exists() for name in "abc")


@pytest.mark.parametrize("d, heads, layers, side, vocab, biased", CONFIGS[:2])
def test_greedy_sampling_of_an_import_equals_hugging_face_generate(tmp_path, d, heads, layers, side, vocab, biased):
    """The decode path (one-pixel steps through folded weights) against HF's own cached generation."""
    from igpt.sample import sample

    theirs = hf_model(d, heads, layers, side, vocab, biased, seed=7)
    theirs.save_pretrained(tmp_path)
    random_palette(vocab).save_hf(tmp_path, resolution=side)
    ours, _ = from_hf(tmp_path)
    prefix = torch.randint(0, vocab, (3, side), generator=torch.Generator().manual_seed(5))  # a top row per image
    for rows in (prefix[:, :0], prefix):
        start = torch.cat([torch.full((3, 1), vocab), rows], dim=1)
        with torch.no_grad():
            expected = theirs.generate(input_ids=start, attention_mask=torch.ones_like(start),  # colour 0 is no pad
                                       max_length=side * side + 1, do_sample=False, use_cache=True,
                                       pad_token_id=0)[:, 1:]
        torch.testing.assert_close(sample(ours, 3, rows if rows.shape[1] else None, greedy=True), expected)


def test_an_export_carries_a_model_card_with_the_runs_data_score_and_command(tiny_copy, tmp_path):
    from huggingface_hub import ModelCard

    from igpt.cli import main
    from igpt.runrecord import read_record

    assert main(["eval", "--ckpt", str(tiny_copy), "--json", str(tiny_copy / "eval.json")]) == 0
    measured = json.loads((tiny_copy / "eval.json").read_text())["bits_per_pixel"]
    assert main(["convert", "--to-hf", str(tiny_copy / "best"), "--out", str(tmp_path / "hf")]) == 0
    text = (tmp_path / "hf" / "README.md").read_text()
    card = ModelCard(text)  # Hugging Face's own parser and validator of the metadata block
    assert card.data.library_name == "transformers" and {"image-gpt", "igpt", "image-generation"} <= set(card.data.tags)
    assert card.data.datasets == ["digits"] and card.data.resolution == 8 and card.data.palette_size == 17
    (result,) = card.data.eval_results
    assert result.metric_type == "bits_per_pixel" and result.dataset_split == "test"
    assert result.metric_value == pytest.approx(measured, abs=1e-4)
    command = text.split("```sh\n")[1].split("\n")[0]
    assert command.startswith("igpt train --data digits --resolution 8 ")
    assert f"--steps {read_record(tiny_copy)['config']['steps']}" in command and "--positions 1d" in command


def test_a_model_without_a_run_gets_a_card_of_what_its_files_say(tmp_path):
    from huggingface_hub import ModelCard

    to_hf(ImageGPT(ImageGPTConfig(vocab_size=16, n_ctx=16, n_embd=32, n_layer=1, n_head=2)), random_palette(16),
          tmp_path / "plain")
    card = ModelCard((tmp_path / "plain" / "README.md").read_text())
    assert card.data.resolution == 4 and card.data.palette_size == 16 and card.data.library_name == "transformers"
    assert card.data.eval_results is None and card.data.datasets is None and "## Training" not in card.text
