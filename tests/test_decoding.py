"""Incremental decoding: the cache, the prefix pass and the one-pixel steps against the full forward."""

import subprocess

import pytest
import torch

from conftest import STEPS, random_model, step_decoder
from igpt import IgptError
from igpt.decoding import DecodeWeights, Decoder

PHASES = 6  # decode_kernel.cpp's Phase: a block's four products and its attention, then the head


@torch.no_grad()
@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("bias", [False, True])
def test_cached_decoding_equals_the_full_forward_at_every_position(bias, step):
    model = random_model(bias=bias)
    tokens = torch.randint(0, 13, (3, 25), generator=torch.Generator().manual_seed(1))
    full = model(tokens)
    for prefix in (0, 1, 7):
        decoder = step_decoder(model, 3, step)
        logits = decoder.feed(tokens[:, :prefix] if prefix else None)
        torch.testing.assert_close(logits, full[:, prefix], atol=1e-4, rtol=0)
        for i in range(prefix, 24):
            logits = decoder.feed(tokens[:, i : i + 1])
            torch.testing.assert_close(logits, full[:, i + 1], atol=1e-4, rtol=0)
        assert decoder.cache.pos == 25 and (step != "static" or int(decoder.cache.index) == 25)
    with pytest.raises(IgptError, match="past the context"):
        decoder.feed(tokens[:, :1])


def test_chunked_step_after_context_is_causal_within_the_chunk():
    model = random_model()
    tokens = torch.randint(0, 13, (2, 25))
    full = model(tokens)
    decoder = Decoder(model, 2)
    decoder.feed(tokens[:, :4])
    torch.testing.assert_close(decoder.feed(tokens[:, 4:9]), full[:, 9], atol=1e-4, rtol=0)


def test_one_token_step_costs_a_context_share_of_a_full_forward(monkeypatch):
    """Counted by PyTorch, so every attention as products it counts: the full forward in SDPA's math kernel
    (neither its CPU flash kernel nor igpt's kernels are counted), the step eager."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from igpt.attention import band_kernel

    monkeypatch.setattr(band_kernel, "applies", lambda q: False)
    model = random_model()
    tokens = torch.randint(0, 13, (1, 25))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as full:
        model(tokens)
    decoder = Decoder(model, 1, kernel=False)
    decoder.feed(tokens[:, :23])
    with FlopCounterMode(display=False) as last:
        decoder.feed(tokens[:, 23:24])
    assert last.get_total_flops() <= 1.1 * full.get_total_flops() / 25


def test_cache_follows_autocast_and_cached_decoding_runs_in_bf16():
    model = random_model()
    tokens = torch.randint(0, 13, (2, 25))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        decoder = Decoder(model, 2)
        first = decoder.feed(tokens[:, :5])
        second = decoder.feed(tokens[:, 5:6])
    assert decoder.cache.k[0].dtype == torch.bfloat16 and decoder.cache.pos == 7
    full = model(tokens)
    assert (first.float() - full[:, 5]).abs().max() < 0.1 and (second.float() - full[:, 6]).abs().max() < 0.1
    assert Decoder(model, 1).cache.k[0].dtype == torch.float32


def test_bert_models_have_no_incremental_decoding():
    with pytest.raises(IgptError, match="autoregressive"):
        Decoder(random_model("bert"), 1)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("attention", ["dense", "local", "strided"])
@pytest.mark.parametrize("rows, vocab, width, heads", [(1, 13, 32, 4), (9, 40, 32, 2), (17, 512, 32, 8),
                                                     (5, 64, 96, 2), (6, 40, 64, 2), (3, 40, 64, 2),
                                                     (3, 40, 128, 2), (7, 40, 64, 1), (4, 40, 33, 3)])
def test_the_kernel_step_equals_the_eager_step(attention, dtype, rows, vocab, width, heads):
    """decode_kernel.cpp against the eager step on the same cache, every pattern, fp32 and bf16: batch sizes on
    both sides of the rows it holds in registers, vocabularies that are and are not whole vectors, head sizes
    (4 to 64) that are and are not, (row, head) pairs that fill its groups and that leave some over, an odd width
    (its paired panels padded). In bf16 the kernel sums in float from bf16 weights and keys (with AVX512-BF16 from
    its products' inputs rounded to bf16 too, before the norm's factor), the eager step rounds every product."""
    model = random_model(attention=attention, positions="2d", window_rows=1, vocab_size=vocab, n_embd=width,
                         n_head=heads, bias=True)
    tokens = torch.randint(0, vocab, (rows, 25), generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        logits = {}
        for step in ("eager", "kernel"):
            decoder = step_decoder(model, rows, step)
            logits[step] = [decoder.feed(tokens[:, :3])] + [decoder.feed(tokens[:, i : i + 1]) for i in range(3, 24)]
            assert decoder.cache.k[0].dtype == dtype
    ours, theirs = (torch.stack(logits[step]).float() for step in ("kernel", "eager"))
    tolerance = 1e-5 if dtype == torch.float32 else 0.03 * theirs.abs().max().item()
    torch.testing.assert_close(ours, theirs, atol=tolerance, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("attention", ["dense", "strided"])
@pytest.mark.parametrize("rates", [(1.0, 0.0), (1e6, 1.0), (0.0, 0.0, 3.0, 1.0, 1e6)])
def test_the_kernel_s_threads_shared_out_by_any_speeds_compute_the_same_logits(attention, dtype, rates):
    """Balance splits each phase by the threads' past speeds, which a test machine's timing never makes uneven
    on demand: here the speeds the kernel keeps in its work buffer are set before every step (a thread never
    timed, one a million times faster, so the quarter-speed floor holds, and five threads for two cores, more
    than some phases have panels or groups). Each panel and group is computed whole by one thread, so the
    logits are exactly those of the even split."""
    model = random_model(attention=attention, positions="2d", window_rows=1, vocab_size=13, n_embd=32, n_head=4,
                         bias=True)
    tokens = torch.randint(0, 13, (3, 25), generator=torch.Generator().manual_seed(3))
    threads = torch.get_num_threads()
    torch.set_num_threads(len(rates))
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            logits = {}
            for skewed in (False, True):
                decoder = step_decoder(model, 3, "kernel")
                work = decoder.kernel_step.work
                speeds = work[-PHASES * 2 * len(rates):].view(PHASES, 2, len(rates))  # (phase, buffer, thread)
                logits[skewed] = [decoder.feed(tokens[:, :3])]
                for i in range(3, 24):
                    if skewed:
                        speeds[:] = torch.tensor(rates)
                    logits[skewed].append(decoder.feed(tokens[:, i : i + 1]))
                    if skewed:  # the kernel timed its threads and wrote their speeds where these were set
                        assert not torch.equal(speeds, torch.tensor(rates).expand_as(speeds))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(torch.stack(logits[True]), torch.stack(logits[False]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [32, 40, 33])
@pytest.mark.parametrize("panel", [32, 16, 8])
@pytest.mark.parametrize("vocab", [13, 41])
@pytest.mark.parametrize("paired", [False, True])
def test_the_kernel_s_panels_hold_the_stored_weights_exactly(dtype, width, panel, vocab, paired):
    """The two layouts of the decode weights, built apart: the same numbers, rounded alike in bf16, and only zeros
    in the padding; matrices that fill the panels, that do not, and that fill none (vocabularies of 13 and 41), at
    the panel widths of AVX-512, AVX2 and SSE, with rows in pairs (an odd width's padded with a zero row) and not;
    and each width its own panels."""
    weights = DecodeWeights(random_model(n_embd=width, n_head=3 if width % 2 else 4, bias=True, vocab_size=vocab),
                            dtype)
    blocks, head = weights.panels(panel, paired)
    packed = [pair for block in blocks for pair in block] + [(head, None)]
    stored = [pair for block in weights.blocks for pair in block] + [(weights.head, None)]
    for (panels, panel_bias), (matrix, bias) in zip(packed, stored, strict=True):
        assert panels.dtype == matrix.dtype == dtype and panels.is_contiguous()
        if paired:  # (panels, in / 2, width, 2) back to (panels, in, width), and the padding row
            panels = panels.transpose(2, 3).flatten(1, 2)
            assert panels.shape[1] == matrix.shape[0] + matrix.shape[0] % 2 and not panels[:, matrix.shape[0]:].any()
            panels = panels[:, : matrix.shape[0]]
        columns = panels.transpose(0, 1).reshape(matrix.shape[0], -1)  # (in, panels x width)
        n = matrix.shape[1]
        assert torch.equal(columns[:, :n], matrix) and not columns[:, n:].any()
        if bias is not None:
            assert torch.equal(panel_bias[:n], bias) and not panel_bias[n:].any()
    other = 8 if panel != 8 else 16
    assert weights.panels(other, paired)[1].shape[2] == other
    assert weights.panels(panel, paired)[1] is head and weights.panels(panel, not paired)[1] is not head


def test_the_kernel_multiplies_bf16_in_pairs_where_the_cpu_has_avx512_bf16():
    """Where the CPU lists avx512_bf16 and the compiler targets it, the kernel's bf16 products run in vdpbf16ps on
    paired panels; elsewhere in float FMAs. A build that lost that path would still pass every other test, only
    slower."""
    from igpt.decoding import KERNEL
    from igpt.kernels import COMPILE, compiler_command, cpu_identity

    if not KERNEL.available():
        pytest.skip("no C++ compiler builds igpt's decode kernel here")
    cpu = "avx512_bf16" in cpu_identity().split()
    macros = subprocess.run([*compiler_command(), *COMPILE, "-dM", "-E", "-x", "c++", "-"], input="",
                            capture_output=True, text=True, check=True).stdout
    if cpu and "__AVX512BF16__" not in macros:
        pytest.skip("the CPU has avx512_bf16 but this compiler does not target it (GCC 10 or later does)")
    assert bool(KERNEL.library().decode_paired()) == cpu


@torch.no_grad()
def test_sampling_from_an_empty_prefix_in_the_kernel_builds_only_its_panels():
    decoder = step_decoder(random_model(), 2, "kernel")
    decoder.feed(None)
    decoder.feed_and_draw(torch.zeros(2, 25, dtype=torch.int64), 24, None, 1.0)
    assert decoder.weights._stored is None and decoder.weights._panels


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [0.05, 1.0, 3.0])
def test_the_kernel_draws_as_sample_draws(dtype, temperature):
    """The kernel's own pick of the next pixel against sample.draw (and argmax) on the logits it returns, with the
    same uniform numbers: flat and sharp distributions, a vocabulary larger than the context. The two sum in
    float in other orders, so a draw may differ only where its target lies within float rounding of a step of
    the cumulative distribution."""
    from igpt.sample import draw, uniforms

    model = random_model(vocab_size=40)
    rows = 64
    tokens = torch.randint(0, 40, (rows, 25), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        decoder = step_decoder(model, rows, "kernel")
        decoder.feed(tokens[:, :3])
        for i in range(4, 25):  # the step at position i feeds pixel i - 1 and draws pixel i
            numbers = uniforms(rows, torch.Generator().manual_seed(i), torch.device("cpu"))
            drawn, greedy, fed = tokens.clone(), tokens.clone(), tokens.clone()
            logits = decoder.kernel_step.draw(drawn, 1, numbers[None], temperature)
            decoder.kernel_step.draw(greedy, 1, None, 1.0)
            probs = (logits / temperature).softmax(-1)
            expected = draw(probs, torch.Generator().manual_seed(i))
            cdf = probs.double().cumsum(-1)
            target = (1 - numbers.double()) * cdf[:, -1]
            differ = drawn[:, i] != expected
            edge = cdf.gather(1, torch.minimum(drawn[:, i], expected)[:, None])[:, 0]
            assert ((edge - target).abs()[differ] < 1e-6).all() and differ.sum() <= 1
            assert torch.equal(greedy[:, i], logits.argmax(-1))
            assert torch.equal(greedy[:, :i], tokens[:, :i]) and torch.equal(greedy[:, i + 1 :], tokens[:, i + 1 :])
            decoder.feed_and_draw(fed, 1, numbers[None], temperature)
            assert torch.equal(fed, drawn)


@torch.no_grad()
@pytest.mark.parametrize("attention", ["dense", "local", "strided"])
def test_a_run_of_drawn_steps_equals_one_step_at_a_time(attention):
    """feed_and_draw over several pixels in one call: each pixel drawn is the next step's input, and the cache
    ends where single steps leave it."""
    model = random_model(attention=attention, vocab_size=40)
    start = torch.randint(0, 40, (5, 25), generator=torch.Generator().manual_seed(0))
    numbers = torch.rand(21, 5, generator=torch.Generator().manual_seed(1))
    runs, caches = [], []
    for lengths in ([1] * 21, [5, 10, 6], [21]):
        decoder = step_decoder(model, 5, "kernel")
        decoder.feed(start[:, :3])
        out, done = start.clone(), 0
        for steps in lengths:
            decoder.feed_and_draw(out, steps, numbers[done : done + steps], 1.0)
            done += steps
        assert decoder.cache.pos == 25 and torch.equal(out[:, :4], start[:, :4])
        runs.append(out)
        caches.append([*decoder.cache.k, *decoder.cache.v])
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(*caches))
    assert not torch.equal(runs[0][:, 4:], start[:, 4:])


@torch.no_grad()
def test_feed_and_draw_refuses_what_it_cannot_do():
    model = random_model()
    decoder = step_decoder(model, 2, "kernel")
    decoder.feed(torch.zeros(2, 3, dtype=torch.long))
    out = torch.zeros(2, 25, dtype=torch.long)
    with pytest.raises(IgptError, match="one uniform number per step and row, a CPU tensor of shape "
                       "\\(1, 2\\), not cpu \\(3,\\)"):
        decoder.feed_and_draw(out, 1, torch.rand(3), 1.0)
    with pytest.raises(IgptError, match="temperature must be > 0"):
        decoder.feed_and_draw(out, 1, torch.rand(1, 2), 0.0)
    with pytest.raises(IgptError, match="contiguous CPU int64 tensor of shape \\(2, 25\\), not cpu torch.int32"):
        decoder.feed_and_draw(out.int(), 1, None, 1.0)
    with pytest.raises(IgptError, match="not 22 from position 4"):
        decoder.feed_and_draw(out, 22, None, 1.0)
    with pytest.raises(IgptError, match="no kernel step to draw in"):
        step_decoder(model, 2, "eager").feed_and_draw(out, 1, torch.rand(1, 2), 1.0)
    out[1, 3] = 13
    with pytest.raises(IgptError, match="outside the vocabulary of 13"):
        decoder.feed_and_draw(out, 1, None, 1.0)
    assert decoder.cache.pos == 4


@torch.no_grad()
def test_the_kernel_step_reads_any_integer_tokens_and_refuses_bad_ones():
    model = random_model()
    logits = []
    for dtype in (torch.int64, torch.int32):
        decoder = step_decoder(model, 2, "kernel")
        decoder.feed(torch.zeros(2, 3, dtype=dtype))
        logits.append(decoder.feed(torch.tensor([[1], [12]], dtype=dtype)))
    torch.testing.assert_close(logits[0], logits[1])
    with pytest.raises(IgptError, match="outside the vocabulary of 13"):
        decoder.feed(torch.tensor([[1], [13]]))
    with pytest.raises(IgptError, match="holds 2 rows; it was fed tokens of shape \\(1,\\)"):
        decoder.feed(torch.tensor([[1]]))


def test_the_kernel_step_stands_aside_for_decode_weights_of_another_dtype():
    """Weights laid out for one dtype and a cache of another: the eager step's own error, not the kernel's misreads."""
    model = random_model()
    weights = Decoder(model, 1).weights
    with torch.autocast("cpu", dtype=torch.bfloat16):
        decoder = Decoder(model, 1, weights=weights)
    assert decoder.kernel_step is None
