"""Data larger than memory: parallel and resumable cache builds, memory-mapped batches, reads sharded by rank."""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import PAPER_FLAGS, TINY

from igpt import Palette, data
from igpt.batches import Batches, PadCropFlip, process_rows
from igpt.checkpoint import RunFolder
from igpt.data import cache, imagenet
from igpt.distributed import World

PALETTE = Palette(np.random.default_rng(1).uniform(-1, 1, (16, 3)).astype(np.float32))


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("IGPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cache, "CHUNK_BYTES", 4096)  # several chunks from a few images


def smooth_images(n: int, side: int, seed: int = 0) -> np.ndarray:
    """Images with few distinct colours, as photographs have: blocks of colour with a little noise."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (n, 2, 2, 3)).repeat(side // 2, 1).repeat(side // 2, 2)
    return np.clip(blocks + rng.integers(-3, 4, blocks.shape), 0, 255).astype(np.uint8)


def write_npz(path: Path, n: int = 240, side: int = 8) -> np.ndarray:
    images = smooth_images(n, side)
    np.savez(path, x_train=images, y_train=np.arange(n) % 3)
    return images


def write_jpegs(root: Path, n: int = 60, bad: int | None = None) -> None:
    for i, image in enumerate(smooth_images(n, 16, seed=2)):
        (root / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        path = root / f"c{i % 3}" / f"{i:03d}.jpg"
        if i == bad:
            path.write_bytes(b"not a jpeg")
        else:
            Image.fromarray(image).save(path, quality=90)


def write_imagenet(root: Path, fmt: str, per_batch: int = 12) -> None:
    """A small imagenet32: ten train batches and val_data, as .npz (stored) or pickles."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    for k, stem in enumerate([*imagenet.BATCHES["train"], "val_data"]):
        planes = smooth_images(per_batch, 32, seed=10 + k).transpose(0, 3, 1, 2).reshape(per_batch, -1)
        batch = {"data": planes, "labels": rng.integers(1, 1001, per_batch)}
        if fmt == "npz":
            np.savez(root / f"{stem}.npz", **batch)
        else:
            (root / stem).write_bytes(pickle.dumps(batch))


def sources(tmp_path: Path, which: str) -> tuple[str, dict]:
    """(spec, load keywords) of a small source of each kind the builds read."""
    if which == "npz":
        write_npz(tmp_path / "s.npz")
        return str(tmp_path / "s.npz"), {}
    if which == "jpegs":
        write_jpegs(tmp_path / "jpegs", bad=7)
        return str(tmp_path / "jpegs"), {"skip_bad": True}
    write_imagenet(tmp_path / which, which.split("-")[1])
    return "imagenet32", {"data_dir": tmp_path / which}


def pids_of_chunks(monkeypatch, log: Path) -> None:
    """Each chunk's images appends the pid that computed it to `log`."""
    images = data._images

    def logged(selection, shape, start, stop):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        return images(selection, shape, start, stop)

    monkeypatch.setattr(data, "_images", logged)


@pytest.mark.parametrize("which", ["npz", "jpegs", "imagenet-npz", "imagenet-pickle"])
def test_worker_processes_build_the_tokens_and_pixels_a_single_process_builds(tmp_path, monkeypatch, which):
    spec, where = sources(tmp_path, which)
    resolution = 8
    single = {split: (data.load(spec, split, resolution, **where),
                      data.load_tokens(spec, split, resolution, PALETTE, **where)) for split in ("train", "val")}
    monkeypatch.setenv("IGPT_CACHE", str(tmp_path / "parallel"))
    monkeypatch.setattr(data, "_PARALLEL_PIXELS", 1)
    monkeypatch.setattr(data, "_PARALLEL_FILES", 1)
    monkeypatch.setattr(data, "cores", lambda: 3)  # workers: 3 to decode, 2 beside this process encoding
    pids_of_chunks(monkeypatch, tmp_path / "pids")
    for split, (images, tokens) in single.items():
        built = data.load_tokens(spec, split, resolution, PALETTE, **where)  # straight from the source
        assert built.tokens.tobytes() == tokens.tokens.tobytes() and isinstance(built.tokens, np.memmap)
        np.testing.assert_array_equal(built.labels, tokens.labels)
        np.testing.assert_array_equal(built.tokens, PALETTE.encode(np.asarray(images.images)))
        pixels = data.load(spec, split, resolution, **where)
        assert pixels.images.tobytes() == images.images.tobytes() and pixels.skipped == images.skipped
        np.testing.assert_array_equal(pixels.labels, images.labels)
    pids = set((tmp_path / "pids").read_text().split())
    assert len(pids) >= 2 and str(os.getpid()) not in pids  # worker processes computed the chunks
    if which == "jpegs":
        assert single["train"][0].skipped + single["val"][0].skipped == 1


def test_a_pickled_batch_file_is_read_in_one_piece_and_a_stored_npz_row_by_row(tmp_path):
    write_imagenet(tmp_path / "pickle", "pickle")
    write_imagenet(tmp_path / "npz", "npz")
    pickled = data.open_source("imagenet32", tmp_path / "pickle").splits["train"].images
    stored = data.open_source("imagenet32", tmp_path / "npz").splits["train"].images
    assert pickled.pieces == list(range(0, 120, 12)) and stored.pieces is None
    assert isinstance(imagenet._mapped_field(tmp_path / "npz" / "val_data.npz", "data"), np.memmap)
    np.testing.assert_array_equal(np.stack([stored[i] for i in range(120)]),
                                  np.stack([pickled[i] for i in range(120)]))
    selection = data._select("imagenet32", "train", 8, data_dir=tmp_path / "pickle")
    build = data._row_build(selection, (8, 8, 3), {"images": (np.uint8, (8, 8, 3))}, lambda x: {"images": x})
    starts = [a for a, _ in build.chunks()]
    assert len(starts) == 10 and all(np.diff(np.searchsorted(pickled.starts, selection.rows[starts], "right")) == 1)


def interrupted_build(monkeypatch, after: int, spec: str) -> None:
    """Start the token build of `spec` and stop it (as a kill would) once `after` chunks are recorded done."""
    written = []
    record = cache.atomic_write_json

    def record_then_stop(path, progress):
        record(path, progress)
        written.append(len(progress["done"]))
        if len(progress["done"]) == after:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(cache, "atomic_write_json", record_then_stop)
        with pytest.raises(KeyboardInterrupt):
            data.load_tokens(spec, "train", 8, PALETTE)
    assert written[-1] == after


def test_an_interrupted_build_resumes_where_it_stopped(tmp_path, monkeypatch):
    spec = str(tmp_path / "s.npz")
    write_npz(tmp_path / "s.npz")
    interrupted_build(monkeypatch, 3, spec)
    part = next((tmp_path / "cache" / "tokens").glob(".part-*/progress.json"))
    progress = json.loads(part.read_text())
    assert len(progress["chunks"]) > 5 and sorted(map(int, progress["done"])) == [0, 1, 2]
    assert not [p for p in (tmp_path / "cache" / "tokens").iterdir() if not p.name.startswith(".")]  # none complete
    computed = []
    images = data._images
    monkeypatch.setattr(data, "_images", lambda sel, shape, a, b: computed.append([a, b]) or images(sel, shape, a, b))
    resumed = data.load_tokens(spec, "train", 8, PALETTE)
    assert computed == progress["chunks"][3:]  # only the chunks not done
    monkeypatch.setenv("IGPT_CACHE", str(tmp_path / "clean"))
    clean = data.load_tokens(spec, "train", 8, PALETTE)
    assert resumed.tokens.tobytes() == clean.tokens.tobytes()
    np.testing.assert_array_equal(resumed.labels, clean.labels)
    assert not list((tmp_path / "cache" / "tokens").glob(".part-*"))  # the build folder became the entry


def test_a_killed_parallel_build_resumes(tmp_path, monkeypatch):
    """SIGKILL of the building process (its workers mid-chunk), then a rebuild: the same tokens as a clean build."""
    write_npz(tmp_path / "s.npz", n=600)
    script = textwrap.dedent(f"""
        import os, signal, numpy as np
        from igpt import Palette, data
        from igpt.data import cache
        cache.CHUNK_BYTES = 4096
        data._PARALLEL_PIXELS, data.cores = 1, lambda: 3
        record = cache.atomic_write_json
        def record_then_die(path, progress):
            record(path, progress)
            if len(progress["done"]) == 4:
                os.kill(os.getpid(), signal.SIGKILL)
        cache.atomic_write_json = record_then_die
        palette = Palette(np.random.default_rng(1).uniform(-1, 1, (16, 3)).astype(np.float32))
        data.load_tokens({str(tmp_path / "s.npz")!r}, "train", 8, palette)
    """)
    env = {**os.environ, "IGPT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    progress = json.loads(next((tmp_path / "cache" / "tokens").glob(".part-*/progress.json")).read_text())
    assert len(progress["done"]) == 4 < len(progress["chunks"])
    resumed = data.load_tokens(str(tmp_path / "s.npz"), "train", 8, PALETTE)
    monkeypatch.setenv("IGPT_CACHE", str(tmp_path / "clean"))
    assert resumed.tokens.tobytes() == data.load_tokens(str(tmp_path / "s.npz"), "train", 8, PALETTE).tokens.tobytes()


def test_bad_data_found_by_a_worker_stops_in_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    write_jpegs(tmp_path / "jpegs", bad=40)
    monkeypatch.setattr(data, "_PARALLEL_FILES", 1)
    monkeypatch.setattr(data, "cores", lambda: 3)
    errors = []
    for split in data.SPLITS:  # the one holding the bad file stops
        try:
            data.load_tokens(str(tmp_path / "jpegs"), split, 8, PALETTE)
        except data.IgptError as err:
            errors.append(str(err))
    assert len(errors) == 1 and re.fullmatch(r"cannot read image c1/040.jpg: .*\(pass --skip-bad .*\)", errors[0])
    assert len(list((tmp_path / "cache" / "tokens").iterdir())) == 2  # the other splits' entries, nothing else


def test_a_full_disk_is_one_line_before_any_work(tmp_path, monkeypatch):
    write_npz(tmp_path / "s.npz")

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    monkeypatch.setattr(data, "_images", lambda *a: pytest.fail("computed rows with no room to write them"))
    with pytest.raises(data.IgptError, match=r"no room for the cache's .*tokens.npy .* set IGPT_CACHE"):
        data.load_tokens(str(tmp_path / "s.npz"), "train", 8, PALETTE)
    assert list((tmp_path / "cache" / "tokens").iterdir()) == []


class CountedRows:
    """Token rows that record which rows each read asked for (and refuse to be read whole)."""

    def __init__(self, tokens: np.ndarray):
        self.tokens, self.reads = tokens, []

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, rows):
        rows = np.asarray(rows)
        assert rows.ndim == 1, "a batch reads rows by index"
        self.reads.append(rows)
        return self.tokens[rows]


def test_memory_mapped_batches_read_only_their_rows_and_equal_batches_in_memory(tmp_path):
    write_npz(tmp_path / "s.npz", n=300)
    tokens = data.load_tokens(str(tmp_path / "s.npz"), "train", 8, PALETTE)
    assert isinstance(tokens.tokens, np.memmap)
    mapped, counted = Batches(16, 5, tokens.tokens, tokens.labels), CountedRows(tokens.tokens)
    in_memory = Batches(16, 5, np.array(tokens.tokens), np.array(tokens.labels))
    reading = Batches(16, 5, counted)
    for step in range(40):  # past an epoch
        a, b = mapped(step), in_memory(step)
        assert a.tokens.equal(b.tokens) and a.labels.equal(b.labels)
        assert reading(step).tokens.equal(a.tokens)
        np.testing.assert_array_equal(counted.reads[-1], mapped.indices(step))


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc")
def test_gathered_rows_come_from_the_file_without_mapping_its_pages(tmp_path):
    path = tmp_path / "tokens.npy"
    written = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint16, shape=(8192, 1024))
    written[:] = np.arange(8192, dtype=np.uint16)[:, None]
    written.flush()
    del written
    tokens = np.load(path, mmap_mode="r")
    rows = np.sort(np.random.default_rng(0).choice(8192, 512, replace=False))

    def resident_file_pages() -> int:
        line = next(line for line in open("/proc/self/status") if line.startswith("RssFile:"))
        return int(line.split()[1]) * 1024

    before = resident_file_pages()
    gathered = cache.gather_rows(tokens, rows)
    assert resident_file_pages() - before < 1 << 20  # the rows' 1 MB, read without mapping 16 MB
    np.testing.assert_array_equal(gathered, tokens[rows])
    np.testing.assert_array_equal(cache.gather_rows(tokens[100:], [0, 7, -1]), tokens[100:][[0, 7, -1]])  # a view
    np.testing.assert_array_equal(cache.gather_rows(np.arange(12).reshape(4, 3), [3, 1]), [[9, 10, 11], [3, 4, 5]])


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_two_ranks_read_disjoint_rows_whose_union_is_the_global_batch(tmp_path, grad_accum):
    tokens = PALETTE.encode(smooth_images(200, 8)).astype(np.uint16)
    labels = np.arange(200) % 7
    whole = Batches(32, 3, tokens, labels)
    ranks = []
    for rank in (0, 1):
        counted = CountedRows(tokens)
        batches = Batches(32, 3, counted, labels)
        batches.keep(process_rows(32, grad_accum, World(rank=rank, size=2)))
        ranks.append((batches, counted))
    for step in (0, 1, 7, 12):
        full = whole(step)
        shares = [batches(step) for batches, _ in ranks]
        read = [set(counted.reads[-1].tolist()) for _, counted in ranks]
        assert not read[0] & read[1] and read[0] | read[1] == set(whole.indices(step).tolist())
        for rank, share in enumerate(shares):
            assert len(share) == 32 and share.shape == (32, 64) and len(share.tokens) == 16
            for part in process_rows(32, grad_accum, World(rank=rank, size=2)):
                assert share.rows(part).tokens.equal(full.rows(part).tokens)
                assert share.rows(part).labels.equal(full.rows(part).labels)
            with pytest.raises(ValueError, match="not all held"):
                share.rows(slice(0, 32))


def test_augmented_shares_are_the_global_batchs_rows():
    pixels = smooth_images(64, 8)
    augment = PadCropFlip(pixels, PALETTE, flip=True)
    whole = Batches(16, 0, np.zeros((64, 64), np.uint16), augment=augment)
    share = Batches(16, 0, np.zeros((64, 64), np.uint16), augment=augment)
    share.keep(process_rows(16, 2, World(rank=1, size=2)))
    for step in range(3):
        held = np.concatenate([np.arange(16)[part] for part in process_rows(16, 2, World(rank=1, size=2))])
        assert share(step).tokens.equal(whole(step).tokens[held])


def test_one_process_keeps_every_row():
    batches = Batches(8, 0, np.zeros((20, 4), np.uint16))
    batches.keep(process_rows(8, 2, World()))
    assert batches.held is None and len(batches(0).tokens) == 8


@pytest.mark.slow
def test_torchrun_with_two_gloo_processes_matches_one_on_a_memory_mapped_npz(tmp_path):
    write_npz(tmp_path / "s.npz", n=200)
    model = [arg for name, value in TINY.items() for arg in (f"--{name.replace('_', '-')}", str(value))]
    common = ["train", "--data", str(tmp_path / "s.npz"), "--resolution", "8", "--palette", "openai", "--steps", "3",
              "--batch-size", "16", "--eval-batches", "1", "--eval-every", "3", "--sample-every", "3", "--device",
              "cpu", "--precision", "fp32", *PAPER_FLAGS, *model]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "igpt.cli", *common, "--out", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          "29591", "-m", "igpt.cli", *common, "--out", str(tmp_path / "two")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]

    def losses(run: Path) -> list[float]:
        return [record["loss"] for record in RunFolder(run).metrics() if "loss" in record]

    assert len(losses(tmp_path / "one")) == 3
    np.testing.assert_allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), atol=1e-5)
