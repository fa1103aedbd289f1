"""Beyond the paper: 2-D positions and local/strided attention, exact against their definitions."""

import itertools
import json

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula, sdpa_flop_count

from conftest import PAPER, STEPS, TINY_RUN, band_mask, qkv_outputs_and_gradients, random_model, step_decoder
from igpt import IgptError
from igpt.attention import band_kernel
from igpt.attention import backends as model_module
from igpt.decoding import Decoder
from igpt.attention import band_attention, column_attention
from igpt.model import ImageGPT, ImageGPTConfig
from igpt.sample import sample

SIDE, VOCAB = 5, 13  # random_model's images
COMBINATIONS = list(itertools.product(("1d", "2d"), ("dense", "local", "strided")))


def sees(attention: str, layer: int, i: int, j: int, side: int = SIDE, rows: int = 2) -> bool:
    """The patterns as the issue defines them: does input position i attend to input position j?"""
    if attention == "local":
        return i - rows * side < j <= i
    if attention == "strided" and layer % 2 == 0:
        return i - side < j <= i
    if attention == "strided":
        return j <= i and (i - j) % side == 0
    return j <= i


def reach(model: ImageGPT) -> list[set[int]]:
    """For each token k, the positions whose logits move when token k changes (one batched pass)."""
    n = SIDE * SIDE
    tokens = torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(0))
    changed = tokens.repeat(n + 1, 1)  # row k: token k changed; the last row as it was
    changed[torch.arange(n), torch.arange(n)] = (tokens + 1) % VOCAB
    with torch.no_grad():
        logits = model(changed)
    gap = (logits[:n] - logits[n]).abs().amax(-1)
    smallest = gap[gap > 1e-6].min()
    assert smallest > 1e-4, "a reached logit must move clearly"
    return [set(torch.nonzero(row > 1e-6).flatten().tolist()) for row in gap]


@pytest.mark.parametrize("attention, layer", [("dense", 0), ("local", 0), ("strided", 0), ("strided", 1)],
                         ids=["dense", "local", "strided-row", "strided-column"])
def test_one_attention_layer_reaches_exactly_the_logits_its_pattern_allows(attention, layer):
    """Token k is the input at position k + 1 (sos sits at 0). A strided model's column layer is
    tested as layer 1 behind a layer 0 whose attention output is zeroed (its MLP mixes nothing)."""
    model = random_model(attention=attention, n_layer=layer + 1)
    with torch.no_grad():
        for block in model.blocks[:layer]:
            block.attn.proj.weight.zero_()
    n = SIDE * SIDE
    for k, reached in enumerate(reach(model)):
        assert reached == {i for i in range(n) if k + 1 < n and sees(attention, layer, i, k + 1)}, f"token {k}"


def test_two_strided_layers_reach_every_later_logit_and_no_earlier_one():
    model = random_model(attention="strided", n_layer=2)
    n = SIDE * SIDE
    for k, reached in enumerate(reach(model)):
        assert reached == set(range(k + 1, n)), f"token {k}"


@pytest.mark.parametrize("positions", ["1d", "2d"])
def test_a_local_window_spanning_the_image_is_dense_attention(positions):
    local = random_model(attention="local", window_rows=SIDE, positions=positions)
    dense = ImageGPT(ImageGPTConfig(**{**vars(local.config), "attention": "dense"}))
    dense.load_state_dict(local.state_dict())
    tokens = torch.randint(0, VOCAB, (3, SIDE * SIDE))
    with torch.no_grad():
        torch.testing.assert_close(local(tokens), dense(tokens), atol=1e-5, rtol=0)
        torch.testing.assert_close(local(tokens[:, :17]), dense(tokens[:, :17]), atol=1e-5, rtol=0)


def test_two_d_positions_are_a_row_vector_plus_a_column_vector():
    model = random_model(positions="2d")
    assert {"wpe_row", "wpe_col"} <= dict(model.named_parameters()).keys() and not hasattr(model, "wpe")
    assert model.wpe_row.shape == model.wpe_col.shape == (SIDE, 32)
    expected = torch.stack([model.wpe_row[i // SIDE] + model.wpe_col[i % SIDE] for i in range(SIDE * SIDE)])
    torch.testing.assert_close(model.positions(0, SIDE * SIDE), expected)
    torch.testing.assert_close(model.positions_at(torch.tensor([7, 24])), expected[[7, 24]])
    torch.manual_seed(0)
    fresh = ImageGPT(ImageGPTConfig(vocab_size=512, n_ctx=32 * 32, n_embd=256, n_layer=1, n_head=4, positions="2d"))
    assert fresh.wpe_row.std().item() == pytest.approx(0.01, rel=0.1)
    assert fresh.wpe_col.std().item() == pytest.approx(0.01, rel=0.1)


@torch.no_grad()
@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("positions, attention", COMBINATIONS)
def test_cached_decoding_equals_the_full_forward_at_every_position(positions, attention, step):
    model = random_model(positions=positions, attention=attention, window_rows=1)
    tokens = torch.randint(0, VOCAB, (3, SIDE * SIDE), generator=torch.Generator().manual_seed(1))
    full = model(tokens)
    for prefix in (0, 1, 7):
        decoder = step_decoder(model, 3, step)
        logits = decoder.feed(tokens[:, :prefix] if prefix else None)
        torch.testing.assert_close(logits, full[:, prefix], atol=1e-4, rtol=0)
        for i in range(prefix, SIDE * SIDE - 1):
            logits = decoder.feed(tokens[:, i : i + 1])
            torch.testing.assert_close(logits, full[:, i + 1], atol=1e-4, rtol=0)
    decoder = step_decoder(model, 3, step)
    decoder.feed(tokens[:, :4])
    torch.testing.assert_close(decoder.feed(tokens[:, 4:12]), full[:, 12], atol=1e-4, rtol=0)  # a chunk after context
    assert decoder.cache.pos == 13


@pytest.mark.parametrize("positions, attention", COMBINATIONS)
def test_greedy_sampling_equals_the_argmax_of_full_passes(positions, attention):
    model = random_model(positions=positions, attention=attention, window_rows=1)
    fast = sample(model, 3, greedy=True)
    slow = torch.zeros(3, SIDE * SIDE, dtype=torch.long)
    with torch.no_grad():
        for i in range(SIDE * SIDE):
            slow[:, i] = model(slow)[:, i].argmax(-1)
    torch.testing.assert_close(fast, slow)


def test_compiled_sampling_equals_eager_sampling_for_a_strided_model():
    model = random_model(positions="2d", attention="strided")
    prefix = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(sample(model, 2, prefix, greedy=True, compile=True), sample(model, 2, prefix, greedy=True))


@pytest.mark.parametrize("positions, attention", COMBINATIONS)
def test_save_and_load_round_trip(tmp_path, positions, attention):
    model = random_model(positions=positions, attention=attention, window_rows=3)
    model.save_pretrained(tmp_path)
    again = ImageGPT.from_pretrained(tmp_path)
    assert again.config == model.config
    tokens = torch.randint(0, VOCAB, (2, SIDE * SIDE))
    with torch.no_grad():
        torch.testing.assert_close(again(tokens), model(tokens), atol=0, rtol=0)


def test_a_config_written_before_the_patterns_loads_as_the_paper(tmp_path):
    from igpt.data import DataConfig
    from igpt.pretrain import PretrainConfig, Pretraining

    model = random_model()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    old = {k: v for k, v in saved.items() if k not in ("positions", "attention", "window_rows")}
    (tmp_path / "config.json").write_text(json.dumps(old))
    again = ImageGPT.from_pretrained(tmp_path)
    assert (again.config.positions, again.config.attention) == ("1d", "dense") and again.config == model.config
    del old["n_head"]
    with pytest.raises(IgptError, match="lacks fields: n_head"):
        ImageGPTConfig.from_dict(old)
    paper = Pretraining(DataConfig(name="digits", resolution=8), PretrainConfig(positions="1d", attention="dense"))
    record = paper.record()
    record["config"] = {k: v for k, v in record["config"].items() if k not in ("positions", "attention", "window_rows")}
    assert paper.differences(record) == []  # a run saved before the patterns resumes with the paper's flags
    default = Pretraining(DataConfig(name="digits", resolution=8), PretrainConfig())
    assert default.differences(record) == ["positions '1d' (run) vs '2d' (now)",  # today's defaults are not the paper's
                                           "attention 'dense' (run) vs 'strided' (now)"]
    made_by_default = default.record()
    assert made_by_default["config"]["attention"] == "strided"  # run.json names the pattern the model has
    explicit = Pretraining(DataConfig(name="digits", resolution=8), PretrainConfig(attention="strided"))
    assert explicit.differences(made_by_default) == default.differences({**made_by_default, "config": {
        **made_by_default["config"], "attention": None}}) == []  # either way, with or without --attention strided
    record["config"]["attention"] = "local"
    assert paper.differences(record) == ["attention 'local' (run) vs 'dense' (now)"]


def test_the_default_recipe_is_strided_2d_for_ar_and_dense_for_bert():
    from igpt.pretrain import PretrainConfig

    ar = PretrainConfig().model_config(16, 8)
    assert (ar.positions, ar.attention) == ("2d", "strided")
    bert = PretrainConfig(objective="bert").model_config(16, 8)
    assert (bert.positions, bert.attention) == ("2d", "dense")
    with pytest.raises(IgptError, match="needs attention 'dense'"):
        PretrainConfig(objective="bert", attention="strided").model_config(16, 8)


def test_refused_combinations_and_exports(tmp_path):
    from igpt.hf import to_hf
    from igpt.palette import Palette

    small = dict(vocab_size=VOCAB, n_ctx=SIDE * SIDE, n_embd=32, n_layer=2, n_head=2)
    for attention in ("local", "strided"):
        with pytest.raises(IgptError, match="bert objective sees every pixel, so it needs attention 'dense'"):
            ImageGPTConfig(objective="bert", attention=attention, **small)
    with pytest.raises(IgptError, match="n_ctx 12 is not a square"):
        ImageGPTConfig(**{**small, "n_ctx": 12, "positions": "2d"})
    for field, value, match in (("positions", "3d", "positions must be '1d' or '2d'"),
                                ("attention", "axial", "attention must be 'dense', 'local' or 'strided'"),
                                ("window_rows", 0, "window_rows must be >= 1")):
        with pytest.raises(IgptError, match=match):
            ImageGPTConfig(**{**small, field: value})
    palette = Palette(np.linspace(-1, 1, VOCAB * 3, dtype=np.float32).reshape(VOCAB, 3))
    for positions, attention in COMBINATIONS[1:]:
        model = ImageGPT(ImageGPTConfig(**small, positions=positions, attention=attention))
        with pytest.raises(IgptError, match=f"1-D positions and dense attention only; a model with {positions} "
                                            f"positions and {attention} attention cannot be exported"):
            to_hf(model, palette, tmp_path / f"{positions}-{attention}")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("positions", ["1d", "2d"])
def test_bert_trains_with_dense_attention_and_either_positions(positions):
    model = random_model("bert", positions=positions)
    tokens = torch.randint(0, VOCAB, (2, SIDE * SIDE))
    other = tokens.clone()
    other[:, -1] = (other[:, -1] + 1) % VOCAB
    with torch.no_grad():
        assert (model(tokens)[:, 0] - model(other)[:, 0]).abs().max() > 1e-4  # bidirectional
    model.loss(tokens, generator=torch.Generator().manual_seed(0)).backward()
    assert all(p.grad is not None for name, p in model.named_parameters() if name != "sos")  # bert has no sos


def cpu_flash_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """PyTorch counts its CUDA flash kernel but not the CPU one, which igpt's BandAttention calls
    directly: counted here as the math kernel's products over every (query, key) pair, two forward."""
    return sdpa_flop_count(query, key, value)


def cpu_flash_backward_flops(grad, query, key, value, *args, out_shape=None, **kwargs) -> int:
    """Four backward products, as the math kernel's (flash also recomputes the scores, in every pattern alike)."""
    return 2 * sdpa_flop_count(query, key, value)


for op, formula in ((torch.ops.aten._scaled_dot_product_flash_attention_for_cpu, cpu_flash_flops),
                    (torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward, cpu_flash_backward_flops)):
    if op not in flop_registry:  # a later PyTorch may count them itself
        register_flop_formula(op)(formula)


def training_flops(model: ImageGPT, tokens: torch.Tensor) -> int:
    """Forward and backward FLOPs; the math kernel spells attention out as counted matrix products."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.loss(tokens).backward()
    return counter.get_total_flops()


def test_training_flops_fall_as_the_patterns_promise(monkeypatch):
    """At 16x16 every attention matrix product runs over exactly the keys the blocks hold. Keys
    computed over the whole sequence: dense the full square, n^2; a band of w positions the w^2
    square of its first w positions (plain causal attention) and then, per query, its row
    block and the w // side blocks before it, (n - w) x (w + side); a column side x rows^2 =
    n x side. Each of a layer's six products (two forward, four backward) costs 2 x keys x width,
    summed over queries. The counter cannot see inside igpt's C++ band kernel (its operators count
    nothing), so the blocks run here; test_band_kernel.py checks the kernel's own results."""
    monkeypatch.setattr(band_kernel, "applies", lambda q: False)
    side, width, batch, layers = 16, 32, 2, 2
    n = side * side
    config = dict(vocab_size=VOCAB, n_ctx=n, n_embd=width, n_layer=layers, n_head=2)
    tokens = torch.randint(0, VOCAB, (batch, n))
    flops = {attention: training_flops(ImageGPT(ImageGPTConfig(**config, attention=attention)), tokens)
             for attention in ("dense", "local", "strided")}

    def band(w: int) -> int:
        return w * w + (n - w) * (w + side)

    keys = {"dense": [n * n, n * n], "local": [band(2 * side), band(2 * side)], "strided": [band(side), n * side]}
    for attention in ("local", "strided"):
        saved = sum(12 * batch * (dense - ours) * width for dense, ours in zip(keys["dense"], keys[attention]))
        assert flops["dense"] - flops[attention] == saved, attention

    q, k, v = (torch.randn(batch, 2, n, 16, requires_grad=True) for _ in range(3))
    counted = {}
    for name, attend in (("dense", lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)),
                         ("local", lambda: band_attention(q, k, v, 2 * side, side)),
                         ("row", lambda: band_attention(q, k, v, side, side)),
                         ("column", lambda: column_attention(q, k, v, side))):
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            attend().sum().backward()
        counted[name] = counter.get_total_flops()
    assert counted["local"] / counted["dense"] == band(2 * side) / n**2  # 0.1797 at 16x16: O(n x window)
    assert counted["row"] / counted["dense"] == band(side) / n**2
    assert counted["column"] / counted["dense"] == side / n  # O(n x side)


@pytest.mark.parametrize("t, window, block, layout", [(49, 14, 7, "model"), (50, 14, 7, "contiguous"), (23, 10, 5, "model"),
                                                      (12, 14, 7, "model"), (17, 35, 5, "model"), (64, 8, 8, "contiguous")])
@pytest.mark.parametrize("cpu_flash", [True, False], ids=["BandAttention", "plain"])
def test_band_and_column_attention_equal_masked_dense_attention_forward_and_backward(t, window, block, layout,
                                                                                    cpu_flash, monkeypatch):
    """Outputs and the gradients of q, k and v against one dense SDPA call with the pattern's full
    mask, for whole and ragged last rows and a window wider than the sequence; q, k and v as
    the model makes them (views of one (B, t, 3 x width) product) or contiguous; whole rows through
    BandAttention and, as on a PyTorch whose CPU flash kernel takes no mask, through the plain
    operations. A band attention first called under inference mode still trains."""
    if not cpu_flash:
        monkeypatch.setattr(model_module, "cpu_flash_has_masks", lambda: False)
    with torch.inference_mode():
        band_attention(*(torch.randn(2, 3, t, 4) for _ in range(3)), window, block)
    b, h, hd = 2, 3, 4
    qkv = torch.randn(b, t, 3 * h * hd, dtype=torch.float64)
    grad = torch.randn(b, h, t, hd, dtype=torch.float64)
    i, j = torch.arange(t)[:, None], torch.arange(t)
    masks = {"band": band_mask(t, window), "column": (j <= i) & ((i - j) % block == 0)}
    for name, attend in (("band", lambda q, k, v: band_attention(q, k, v, window, block)),
                         ("column", lambda q, k, v: column_attention(q, k, v, block))):
        results = [qkv_outputs_and_gradients(fn, qkv, grad, h, layout) for fn in
                   (attend, lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v,
                                                                                            attn_mask=masks[name]))]
        for ours, dense in zip(*results):
            torch.testing.assert_close(ours, dense, atol=1e-12, rtol=0, msg=name)


def test_the_patterns_run_on_the_fused_kernel():
    """No path back to the math kernel, which would hold every block's scores in memory
    (a 3-D mask once sent band attention there)."""
    q, k, v = (torch.randn(2, 2, 50, 8, requires_grad=True) for _ in range(3))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        band_attention(q, k, v, 14, 7).sum().backward()
        column_attention(q, k, v, 7).sum().backward()


@torch.no_grad()
@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
def test_a_decoding_step_reads_only_what_its_pattern_reads(static):
    """The last pixel of a 16x16 image: dense reads 256 keys per layer, local (one row) 16,
    strided 16 in its row layer and 16 (one per row) in its column layer."""
    side, width, batch = 16, 32, 2
    n = side * side
    config = dict(vocab_size=VOCAB, n_ctx=n, n_embd=width, n_layer=2, n_head=2, window_rows=1)
    tokens = torch.randint(0, VOCAB, (batch, n))
    flops = {}
    for attention in ("dense", "local", "strided"):
        decoder = Decoder(ImageGPT(ImageGPTConfig(**config, attention=attention)), batch, static=static, kernel=False)
        decoder.feed(tokens[:, : n - 2])
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            decoder.feed(tokens[:, n - 2 : n - 1])
        flops[attention] = counter.get_total_flops()
    for attention in ("local", "strided"):  # two products (scores, weighted values) of 2 x keys x width per layer
        assert flops["dense"] - flops[attention] == 2 * 4 * batch * width * (n - side), attention


def test_every_command_runs_the_default_model_with_2d_positions_and_strided_attention(tmp_path, capsys):
    from igpt.cli import main

    run = tmp_path / "run"
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in TINY_RUN.items() if name not in PAPER]
    assert main(["train", "--data", "digits", "--resolution", "8", "--out", str(run), *flags]) == 0
    config = json.loads((run / "config.json").read_text())
    assert (config["positions"], config["attention"]) == ("2d", "strided")
    assert main(["sample", "--ckpt", str(run), "--n", "2", "--out", str(tmp_path / "s.png")]) == 0
    assert np.load(tmp_path / "s.npy").shape == (2, 8, 8, 3)
    assert main(["complete", "--ckpt", str(run), "--n", "1", "--samples", "2", "--out", str(tmp_path / "c.png")]) == 0
    assert main(["eval", "--ckpt", str(run), "--json", str(tmp_path / "eval.json")]) == 0
    assert np.isfinite(json.loads((tmp_path / "eval.json").read_text())["bits_per_pixel"])
    assert main(["probe", "--ckpt", str(run), "--max-train", "100", "--no-baselines",
                 "--out", str(tmp_path / "probe.json")]) == 0
    assert [row["layer"] for row in json.loads((tmp_path / "probe.json").read_text())["layers"]] == [0, 1, 2]
    assert main(["finetune", "--ckpt", str(run), "--out", str(tmp_path / "ft"), "--steps", "2", "--eval-every", "2",
                 "--batch-size", "16"]) == 0
    assert json.loads((tmp_path / "ft" / "config.json").read_text())["attention"] == "strided"
    capsys.readouterr()
    assert main(["convert", "--to-hf", str(run), "--out", str(tmp_path / "hf")]) == 1
    assert "cannot be exported" in capsys.readouterr().err


def test_demo_takes_the_architecture_flags(monkeypatch):
    from igpt import demo
    from igpt.cli import main

    seen = {}
    monkeypatch.setattr(demo, "run_demo", lambda *args, **kwargs: seen.update(kwargs))
    assert main(["demo", "--positions", "2d", "--attention", "local", "--window-rows", "3"]) == 0
    assert (seen["positions"], seen["attention"], seen["window_rows"]) == ("2d", "local", 3)
    plan = demo.plan_for("digits", positions="2d", attention="local", window_rows=3)
    shape = plan.pretrain.model_config(16, plan.data.resolution)
    assert (shape.positions, shape.attention, shape.window_rows) == ("2d", "local", 3)
    assert "2d positions, local attention" in plan.describe()


def test_the_backend_rule_picks_one_backend_per_case(monkeypatch):
    """choose_backend, on its own: on a CPU in float32 or bf16 the kernel takes causal dense layers, columns over
    whole rows and bands longer than their window; without it dense and column layers and short bands run in
    SDPA, a longer band through the flash kernel for whole rows, else the plain blocks; BERT's dense layers
    (not causal) always in SDPA. Every backend it picks computes the pattern's own mask."""
    from igpt.attention import ATTENTION_BACKENDS, Pattern, attend, choose_backend

    q = torch.randn(1, 2, 48, 16)
    band, column = Pattern("band", 8, 16), Pattern("column", 8)
    monkeypatch.setattr(band_kernel, "applies", lambda q: True)
    for x in (q, q.bfloat16()):
        assert choose_backend(x, Pattern("dense")) == choose_backend(x, column) == choose_backend(x, band) == "band_kernel"
    assert choose_backend(q[:, :, :44], column) == "sdpa"  # a ragged last row
    assert choose_backend(q, Pattern("dense", causal=False)) == "sdpa"
    assert choose_backend(q[:, :, :16], band) == "sdpa"
    monkeypatch.setattr(band_kernel, "applies", lambda q: False)
    assert choose_backend(q, Pattern("dense")) == choose_backend(q, column) == "sdpa"
    assert choose_backend(q, band) == "blocked_flash"
    assert choose_backend(q[:, :, :44], band) == "blocked"  # a ragged last row
    monkeypatch.setattr(model_module, "cpu_flash_has_masks", lambda: False)
    assert choose_backend(q, band) == "blocked"
    with pytest.raises(ValueError, match="does not run"):
        attend(q, q, q, column, backend="blocked")
    x = torch.randn(1, 2, 48, 16, dtype=torch.float64)
    for pattern in (band, column, Pattern("band", 8, 24), Pattern("dense")):
        reference = torch.nn.functional.scaled_dot_product_attention(x, x, x, attn_mask=pattern.mask(48))
        for name, backend in ATTENTION_BACKENDS.items():
            if name not in ("flex", "band_kernel", "blocked_flash") and backend.runs(x, pattern):
                torch.testing.assert_close(attend(x, x, x, pattern, backend=name), reference, msg=name)
