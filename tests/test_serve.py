"""`igpt serve`: the page's every action through gradio_client against a real server, and its worker.

The servers run `igpt serve` in subprocesses (tests/conftest.py `Served`) with each decoding step
slowed to 25 ms and counted, so a completion lasts long enough to be watched, queued behind and
stopped. Skipped without Gradio (the `app` extra), except the test of the message that says so.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import Served, train
from igpt.errors import IgptError
from igpt.precision import resolve_precision

SIDE = 8  # the tiny run's pictures
STEP_SECONDS = 0.025


def _gradio():
    """Skip without the app extra; Gradio itself is imported by the servers only, not by the tests."""
    if importlib.util.find_spec("gradio") is None:
        pytest.skip("no gradio: pip install 'igpt[app]'")
    return pytest.importorskip("gradio_client")


@pytest.fixture(scope="module")
def served(tiny_run, tmp_path_factory):
    _gradio()
    server = Served(tiny_run, tmp_path_factory.mktemp("served"), "--max-upload-mb", "0.5",
                    step_seconds=STEP_SECONDS)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def bert_served(tmp_path_factory):
    _gradio()
    run = train(tmp_path_factory.mktemp("bert") / "run", objective="bert")
    server = Served(run, tmp_path_factory.mktemp("bert-served"), "--host", "0.0.0.0")
    yield server
    server.stop()


@pytest.fixture
def client(served, tmp_path):
    return served.client(tmp_path)


def _png(path, image: np.ndarray, mode: str | None = None):
    Image.fromarray(image, mode).save(path)
    return str(path)


def _read(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _complete(client, keep_rows=6, samples=2, seed=5, **options):
    """The streamed outputs of one completion: (grid path, status, download path or None) each."""
    job = client.submit(keep_rows, options.get("temperature", 1.0), options.get("top_k", 0),
                        options.get("top_p", 1.0), samples, seed, api_name="/complete")
    outputs = list(job)
    assert job.status().success, job.status()
    return outputs


def _download(outputs) -> str:
    return outputs[-1][2]


def _check_completed(outputs, keep_rows: int, samples: int):
    """Several grids before the final one, the kept rows identical in every completion, the download the grid."""
    grids = [_read(grid) for grid, _, _ in outputs]
    assert len(grids) == SIDE - keep_rows + 1  # the kept rows in, each sampled row but the last, the finished grid
    assert all(status.startswith("Completing: row") for _, status, _ in outputs[:-1])
    assert "completion" in outputs[-1][1] and isinstance(outputs[-1][2], str)
    saved = _read(_download(outputs))
    scale = 64 // SIDE
    assert saved.shape == (SIDE * scale + 2, (samples + 2) * (SIDE * scale + 1) + 1, 3)
    tiles = [saved[1 : 1 + SIDE * scale, 1 + c * (SIDE * scale + 1) :][:, : SIDE * scale] for c in range(samples + 2)]
    kept = keep_rows * scale
    for tile in tiles[1:-1]:
        np.testing.assert_array_equal(tile[:kept], tiles[0][:kept])  # the input's rows, in the palette's colours
    assert not np.array_equal(grids[0], grids[-1])  # the page saw the grid fill in
    return saved


# ---- the page and its facts ----------------------------------------------------------------------
def test_page_loads_with_the_models_facts(served):
    with urllib.request.urlopen(served.url, timeout=30) as page:
        assert page.status == 200
    with urllib.request.urlopen(served.url + "config", timeout=30) as config:
        text = json.dumps(json.load(config))
    for fact in ("digits", "8x8", "17 colours", "**layers** 2", "32 (2 heads)", "dense (every earlier pixel)",
                 "1d positions", "test bits/pixel", "not measured",
                 f"cpu, {resolve_precision('auto', torch.device('cpu'))}"):
        assert fact in text, fact
    assert "Reachable from other machines" not in text
    assert any(line.startswith("igpt serve: http://127.0.0.1:") for line in served.lines)


def test_test_bits_come_from_an_eval_json_in_the_run_folder(tmp_path):
    from igpt.serve import measured_bits

    assert measured_bits(tmp_path)[1].startswith("not measured")
    (tmp_path / "eval.json").write_text(json.dumps({"bits_per_pixel": 2.3456, "split": "test"}))
    assert measured_bits(tmp_path) == ("test bits/pixel", "2.346 (eval.json)")
    demo = tmp_path / "demo"
    (demo / "run" / "best").mkdir(parents=True)
    (demo / "eval.json").write_text(json.dumps({"bits_per_pixel": 1.5, "split": "test"}))
    assert measured_bits(demo / "run" / "best") == ("test bits/pixel", "1.500 (eval.json)")


def test_a_model_folder_without_its_data_set_serves_without_test_pictures(tiny_run):
    from igpt.checkpoint import load_run
    from igpt.runrecord import RunInfo
    from igpt.serve import ModelWorker, first_test_pictures, model_facts

    model, palette, _ = load_run(tiny_run, "cpu")  # as an imported Hugging Face model: no run.json
    name, gallery = first_test_pictures(RunInfo(), model.config)
    assert name is None and gallery.images is None and "pass --data" in gallery.note
    assert model_facts(ModelWorker(model, palette), tiny_run, name)["data set"] == "not recorded"
    name, gallery = first_test_pictures(RunInfo(), model.config, {"name": "digits"}, n=3)
    assert name == "digits" and gallery.images.shape == (3, SIDE, SIDE, 3) and len(gallery.captions) == 3


# ---- choosing a picture --------------------------------------------------------------------------
def test_a_test_picture_completes_row_by_row(client):
    preview, status = client.predict(3, 6, api_name="/pick_test")
    assert status.startswith("Chosen: test 3 (")
    assert _read(preview).shape[0] >= 128
    outputs = _complete(client, keep_rows=4, samples=3, seed=11)
    saved = _check_completed(outputs, 4, 3)
    again = _read(_download(_complete(client, keep_rows=4, samples=3, seed=11)))
    np.testing.assert_array_equal(saved, again)  # a seed repeats its completions


def test_an_uploaded_png_of_any_size_and_mode_completes(client, tmp_path):
    rng = np.random.default_rng(0)
    files = [_png(tmp_path / "photo.png", rng.integers(0, 256, (300, 200, 4), dtype=np.uint8)),
             _png(tmp_path / "deep.png", rng.integers(0, 65535, (40, 50), dtype=np.uint16)),
             _png(tmp_path / "dot.png", np.full((1, 1, 3), 200, np.uint8))]
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).convert("CMYK").save(tmp_path / "print.jpg")
    Image.fromarray(rng.integers(0, 256, (30, 90, 3), dtype=np.uint8)).convert("P").save(tmp_path / "few.gif")
    files += [str(tmp_path / "print.jpg"), str(tmp_path / "few.gif")]
    from gradio_client import handle_file

    for path in files:
        preview, status = client.predict(handle_file(path), 6, api_name="/upload")
        assert status.startswith("Chosen: ") and "resized to 8x8" in status
    _check_completed(_complete(client), 6, 2)


def test_a_drawing_completes(client, tmp_path):
    from gradio_client import handle_file

    drawing = np.zeros((256, 256, 3), np.uint8)
    drawing[40:216, 110:150] = 255  # a one
    path = _png(tmp_path / "drawing.png", drawing)
    preview, status = client.predict({"background": handle_file(path), "layers": [], "composite": handle_file(path)},
                                     6, api_name="/draw")
    assert status == "Chosen: your drawing, at 8x8."
    column = _read(preview)[:, :, 0].mean(axis=0)
    assert column[len(column) // 2] > column[5]  # the stroke is in the middle, as drawn
    _check_completed(_complete(client), 6, 2)
    with pytest.raises(Exception, match="draw something first"):
        client.predict(None, 6, api_name="/draw")


def test_the_cut_is_drawn_where_the_rows_end(client):
    client.predict(0, 4, api_name="/pick_test")
    for keep_rows in (2, 5):
        shown = _read(client.predict(keep_rows, api_name="/cut"))
        line = keep_rows * len(shown) // SIDE
        red = (shown[:, :, 0] > 200) & (shown[:, :, 1] < 60)
        assert red[line].all() and not red[line + 6].any() and not red[line - 6].any()


def test_the_surprise_map_of_the_chosen_picture(client):
    client.predict(1, 4, api_name="/pick_test")
    first = _read(client.predict(api_name="/surprise"))
    client.predict(2, 4, api_name="/pick_test")
    second = _read(client.predict(api_name="/surprise"))
    assert first.shape[1] > first.shape[0] > 100  # the picture beside its heat map
    assert not np.array_equal(first, second)


# ---- many users, stop ----------------------------------------------------------------------------
def _steps(served) -> int:
    return len(served.steps.read_text())


def test_stop_ends_the_sampling_within_a_row(served, client):
    client.predict(0, 0, api_name="/pick_test")
    before = _steps(served)
    job = client.submit(0, 1.0, 0, 1.0, 8, 3, api_name="/complete")  # 64 steps: 1.6 s at least
    deadline = time.monotonic() + 60
    while len(job.outputs()) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(job.outputs()) >= 2, job.status()
    job.cancel()
    time.sleep(1.0)
    stopped = _steps(served)
    time.sleep(0.5)
    assert _steps(served) == stopped  # nothing decodes any more
    assert stopped - before < SIDE * SIDE - SIDE
    _check_completed(_complete(client), 6, 2)  # and the model serves the next user


def test_users_queue_behind_a_completion_and_the_page_still_loads(served, tmp_path):
    first, second = served.client(tmp_path / "1"), served.client(tmp_path / "2")
    for c in (first, second):
        c.predict(0, 0, api_name="/pick_test")
    running = first.submit(0, 1.0, 0, 1.0, 2, 1, api_name="/complete")
    while not running.outputs():
        time.sleep(0.02)
    waiting = second.submit(0, 1.0, 0, 1.0, 2, 2, api_name="/complete")
    start = time.monotonic()
    with urllib.request.urlopen(served.url, timeout=30) as page:
        assert page.status == 200
    assert time.monotonic() - start < 5 and not waiting.done()  # the page came while the model was busy
    queued = []
    while not waiting.done():
        status = waiting.status()
        if status.code.name == "IN_QUEUE" and status.rank is not None:
            queued.append((status.rank, status.queue_size))
        time.sleep(0.02)
    assert queued, "the second user was never told their place"
    assert running.status().success and waiting.status().success


# ---- bad input -----------------------------------------------------------------------------------
def test_bad_uploads_get_a_message_and_the_server_keeps_running(client, tmp_path):
    from gradio_client import handle_file

    (tmp_path / "notes.txt").write_text("not a picture")
    (tmp_path / "fake.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "whole.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "whole.png").read_bytes()[:60])
    Image.new("1", (12_000, 12_000)).save(tmp_path / "vast.png")  # a small file, a huge picture
    expected = {"notes.txt": "cannot read image notes.txt: not an image", "fake.png": "cannot read image fake.png",
                "cut.png": "cannot read image cut.png", "vast.png": "12000x12000 pixels, more than"}
    for name, message in expected.items():
        with pytest.raises(Exception, match=message):
            client.predict(handle_file(str(tmp_path / name)), 4, api_name="/upload")
    noise = np.random.default_rng(0).integers(0, 256, (600, 600, 3), dtype=np.uint8)
    big = _png(tmp_path / "big.png", noise)  # ~1 MB, over the 0.5 MB this server takes
    with pytest.raises(Exception, match="(?i)size|413"):
        client.predict(handle_file(big), 4, api_name="/upload")
    assert client.predict(2, 4, api_name="/pick_test")[1].startswith("Chosen: test 2")


def test_bad_settings_get_a_message(client):
    client.predict(0, 4, api_name="/pick_test")
    with pytest.raises(Exception, match="greater than maximum"):
        client.predict(4, 1.0, 0, 1.0, 50, 1, api_name="/complete")
    with pytest.raises(Exception, match="less than minimum"):
        client.predict(4, 0.0, 0, 1.0, 2, 1, api_name="/complete")


def test_the_size_limit_is_checked_before_decoding(tmp_path):
    from igpt.serve import read_upload

    path = _png(tmp_path / "a.png", np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    with pytest.raises(IgptError, match=r"a.png is 12.\d KB, more than the 2 KB this page accepts"):
        read_upload(path, SIDE, max_bytes=2048)
    assert read_upload(path, SIDE, max_bytes=100_000)[0].shape == (SIDE, SIDE, 3)


def test_a_bert_run_says_it_cannot_complete_and_shows_its_surprise_map(bert_served, tmp_path):
    client = bert_served.client(tmp_path)
    with urllib.request.urlopen(bert_served.url + "config", timeout=30) as config:
        text = json.dumps(json.load(config))
    assert "This model cannot complete pictures" in text and "bert (masked pixels)" in text
    assert "Reachable from other machines" in text  # --host 0.0.0.0
    assert any("reachable from other machines" in line for line in bert_served.lines)
    client.predict(1, 4, api_name="/pick_test")
    with pytest.raises(Exception, match="bert objective"):
        client.predict(4, 1.0, 0, 1.0, 2, 1, api_name="/complete")
    assert _read(client.predict(api_name="/surprise")).shape[0] > 100


def test_sigterm_stops_the_server_and_it_leaves_nothing_behind(bert_served, tmp_path):
    client = bert_served.client(tmp_path)
    from gradio_client import handle_file

    client.predict(handle_file(_png(tmp_path / "up.png", np.zeros((20, 20, 3), np.uint8))), 4, api_name="/upload")
    client.predict(api_name="/surprise")
    assert any(bert_served.tmp.iterdir())  # its temporary folder, while it serves
    code, seconds = bert_served.stop()
    assert code == 0 and seconds < 20, "".join(bert_served.lines)
    for folder in (bert_served.tmp, bert_served.home, bert_served.cwd):
        assert not any(folder.iterdir()), (folder, list(folder.rglob("*")))
    assert "igpt serve: stopping" in "".join(bert_served.lines)


# ---- the worker, without a server ----------------------------------------------------------------
def test_the_worker_streams_rows_and_stops_when_closed(tiny_run):
    from igpt.checkpoint import load_run
    from igpt.serve import ModelWorker

    model, palette, _ = load_run(tiny_run, "cpu")
    worker = ModelWorker(model, palette)
    image = np.zeros((SIDE, SIDE, 3), np.uint8)
    frames = list(worker.complete(image, 3, 2, seed=1))
    assert [f.filled_rows for f in frames] == [3, 4, 5, 6, 7, 8] and frames[-1].rows.shape == (4, SIDE, SIDE, 3)
    stream = worker.complete(image, 0, 2, seed=1)
    next(stream)
    stream.close()  # returns once the sampling thread has ended
    assert not any(thread.name == "igpt-serve-completion" for thread in threading.enumerate())
    with pytest.raises(IgptError, match="rows to keep"):
        next(worker.complete(image, SIDE + 1, 2))
    with pytest.raises(IgptError, match="top-p"):
        next(worker.complete(image, 2, 2, top_p=1.5))


def test_without_gradio_serve_says_what_to_install(tiny_run, monkeypatch, capsys):
    import importlib.util

    from igpt.cli import main

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else find_spec(name, *a))
    assert main(["serve", "--ckpt", str(tiny_run)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'igpt[app]'" in err
    imported = subprocess.run([sys.executable, "-c", "import sys, igpt, igpt.cli, igpt.serve; "
                               "igpt.cli.build_parser(); print('gradio' in sys.modules)"],
                              capture_output=True, text=True, check=True)
    assert imported.stdout.strip() == "False"  # the core package never imports Gradio on its own
