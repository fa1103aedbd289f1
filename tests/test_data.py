"""Data sets: canonical formats, folders and archives, splits, modes, resizing, caches, bad input."""

import gzip
import hashlib
import http.server
import io
import pickle
import struct
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from igpt import IgptError, Palette, data
from igpt.data import sources

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("IGPT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def rng_images(n, h=6, w=6, c=3, seed=0):
    shape = (n, h, w, c) if c else (n, h, w)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_mnist_files(folder: Path, n_train=30, n_test=10) -> tuple[np.ndarray, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    x_train, x_test = rng_images(n_train, 28, 28, 0), rng_images(n_test, 28, 28, 0, seed=1)
    write_idx(folder / "train-images-idx3-ubyte.gz", x_train)
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.arange(n_train) % 10)
    write_idx(folder / "t10k-images-idx3-ubyte.gz", x_test)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.arange(n_test) % 10)
    return x_train, x_test


def image_bytes(array: np.ndarray, fmt="PNG", mode=None) -> bytes:
    buf = io.BytesIO()
    image = Image.fromarray(array)
    (image.convert(mode) if mode else image).save(buf, format=fmt)
    return buf.getvalue()


def write_tree(root: Path, layout: dict[str, int], size=(6, 6)) -> None:
    for folder, count in layout.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            (root / folder / f"{i}.png").write_bytes(image_bytes(rng_images(1, *size, seed=i)[0]))


# ---- named data sets ----------------------------------------------------------------------------
def test_digits_is_embedded_with_17_grey_levels():
    train = data.load("digits", "train")
    assert train.images.shape[1:] == (8, 8, 3) and train.classes == [str(i) for i in range(10)]
    assert len(np.unique(train.images)) == 17 and train.images.max() == 255
    sizes = {s: len(data.load("digits", s)) for s in data.SPLITS}
    assert sum(sizes.values()) == 1797 and sizes["val"] == sizes["test"] == 180
    assert "seeded 10% of train" in train.describe()


def test_shifted_digits_move_every_digit_and_keep_the_splits_apart():
    native = sources.load_digits_dataset().splits["train"]
    digits, digit_labels = native.images, native.labels
    where = {}  # each sklearn digit's bytes -> its indices (a few digits have a twin)
    for i, image in enumerate(digits):
        where.setdefault(image.tobytes(), set()).add(i)
    side = sources.SHIFTED_CANVAS
    sources_of, places = {}, set()
    for split in data.SPLITS:
        images = data.load("shifted-digits", split)
        assert images.images.shape[1:] == (side, side, 3) and images.classes == [str(i) for i in range(10)]
        found = set()
        for canvas, label in zip(images.images[..., 0], images.labels):
            matches = [(top, left, where[canvas[top : top + 8, left : left + 8].tobytes()])
                       for top in range(side - 7) for left in range(side - 7)
                       if canvas[top : top + 8, left : left + 8].tobytes() in where
                       and canvas.sum() == canvas[top : top + 8, left : left + 8].sum()]
            assert matches, "every canvas holds one whole sklearn digit and nothing else"
            places.update((top, left) for top, left, _ in matches)
            found |= set().union(*(rows for _, _, rows in matches))
            assert label in {int(digit_labels[i]) for i in matches[0][2]}
        sources_of[split] = found
    sizes = {s: len(data.load("shifted-digits", s)) for s in data.SPLITS}
    held = sources.SHIFTED_HELD_OUT
    assert sizes == {"train": (1797 - held["val"] - held["test"]) * sources.SHIFTED_COPIES, **held}
    assert not sources_of["train"] & sources_of["test"] and not sources_of["train"] & sources_of["val"]
    assert len(places) == (side - 7) ** 2  # every place is used
    digests = {name: hashlib.sha256(s.images.tobytes() + s.labels.tobytes()).hexdigest()[:16]
               for name, s in sources.load_shifted_digits().splits.items()}
    assert digests == {"test": "0cd1b97175eb7f5c", "val": "f0042620e750f0c4", "train": "2df30d56829bd670"}  # same everywhere


def test_splits_are_deterministic_and_disjoint():
    native = data.open_source("digits")
    rows = {s: data._plan(native, s, seed=0)[1] for s in data.SPLITS}
    assert sorted(np.concatenate(list(rows.values())).tolist()) == list(range(1797))
    np.testing.assert_array_equal(rows["val"], data._plan(data.open_source("digits"), "val", seed=0)[1])
    assert not np.array_equal(rows["val"], data._plan(native, "val", seed=1)[1])
    np.testing.assert_array_equal(data.load("digits", "val").images, native.splits["train"].images[rows["val"]][..., None].repeat(3, -1))


def test_idx_parser_and_data_dir(tmp_path):
    x_train, x_test = write_mnist_files(tmp_path / "mnist")
    test = data.load("mnist", "test", data_dir=tmp_path / "mnist")
    np.testing.assert_array_equal(test.images[..., 0], x_test)
    assert (test.images[..., 0] == test.images[..., 2]).all() and list(test.labels) == list(np.arange(10) % 10)
    assert len(data.load("mnist", "train", data_dir=tmp_path / "mnist")) == 27  # 10% held out for val
    with pytest.raises(IgptError, match="has no train-images"):
        data.load("mnist", "train", data_dir=tmp_path)
    with pytest.raises(IgptError, match="does not exist"):
        data.load("mnist", "train", data_dir=tmp_path / "nowhere")


def test_idx_rejects_a_damaged_file(tmp_path):
    write_mnist_files(tmp_path)
    raw = gzip.decompress((tmp_path / "t10k-images-idx3-ubyte.gz").read_bytes())
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw[:-50]))
    with pytest.raises(IgptError, match="not a valid IDX file"):
        data.load("mnist", "test", data_dir=tmp_path)


def cifar_batch(n, seed, labels_key=b"labels"):
    x = rng_images(n, 32, 32, 3, seed=seed)
    return {b"data": x.transpose(0, 3, 1, 2).reshape(n, -1), labels_key: list(np.arange(n) % 10)}, x


def test_cifar10_pickles_from_folder_and_tarball(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    expected = []
    for i in range(1, 6):
        batch, x = cifar_batch(4, i)
        expected.append(x)
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch, protocol=2))
    test_batch, x_test = cifar_batch(5, 9)
    (folder / "test_batch").write_bytes(pickle.dumps(test_batch, protocol=2))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}))
    test = data.load("cifar10", "test", data_dir=tmp_path)
    np.testing.assert_array_equal(test.images, x_test)
    assert test.classes[3] == "c3"
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tf:
        tf.add(folder, arcname="cifar-10-batches-py")
    other = tmp_path / "only-tar"
    other.mkdir()
    (tmp_path / "cifar-10-python.tar.gz").rename(other / "cifar-10-python.tar.gz")
    np.testing.assert_array_equal(data.load("cifar10", "test", data_dir=other).images, x_test)


def test_cifar100_uses_fine_labels(tmp_path):
    train, _ = cifar_batch(20, 1, b"fine_labels")
    test, _ = cifar_batch(5, 2, b"fine_labels")
    for name, obj in (("train", train), ("test", test), ("meta", {b"fine_label_names": [b"apple"] * 100})):
        (tmp_path / name).write_bytes(pickle.dumps(obj))
    loaded = data.load("cifar100", "test", data_dir=tmp_path)
    assert len(loaded.classes) == 100 and list(loaded.labels) == list(np.arange(5) % 10)


def test_cifar_pickle_with_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (tmp_path / name).write_bytes(pickle.dumps({b"x": Payload()}))
    with pytest.raises(IgptError, match="refusing to load builtins.print"):
        data.load("cifar10", "test", data_dir=tmp_path)


class _Server:
    def __init__(self, folder: Path):
        handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(folder), **k)  # noqa: E731
        http.server.SimpleHTTPRequestHandler.log_message = lambda *a: None
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"

    def close(self):
        self.httpd.shutdown()


def test_download_verifies_the_checksum(tmp_path, monkeypatch, cache):
    served = tmp_path / "served"
    write_mnist_files(served)
    server = _Server(served)
    try:
        digests = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in served.iterdir()}
        monkeypatch.setitem(sources._IDX, "mnist", {**sources._IDX["mnist"], "url": server.url, "md5": digests})
        assert len(data.load("mnist", "test")) == 10
        assert (cache / "downloads" / "mnist" / "t10k-images-idx3-ubyte.gz").is_file()
        bad = {**digests, "train-images-idx3-ubyte.gz": "0" * 32}
        monkeypatch.setitem(sources._IDX, "mnist", {**sources._IDX["mnist"], "url": server.url, "md5": bad})
        fresh = tmp_path / "fresh"
        monkeypatch.setenv("IGPT_CACHE", str(fresh))
        with pytest.raises(IgptError, match="corrupt"):
            data.load("mnist", "train")
        assert not list((fresh / "downloads" / "mnist").glob("train-images*"))
        assert not list((fresh / "downloads" / "mnist").glob(".*part*"))
        monkeypatch.setitem(sources._IDX, "fashion-mnist", {**sources._IDX["fashion-mnist"], "url": server.url + "x/"})
        with pytest.raises(IgptError, match="cannot download .* --data-dir"):
            data.load("fashion-mnist", "train")
    finally:
        server.close()


# ---- folders, archives, npz -----------------------------------------------------------------------
def test_class_folder_with_wrapper_and_hold_outs(tmp_path):
    write_tree(tmp_path / "wrap", {"cats": 15, "dogs": 15})
    train = data.load(str(tmp_path), "train")  # wrapper folder `wrap` is skipped
    assert train.classes == ["cats", "dogs"] and len(train) == 24
    assert len(data.load(str(tmp_path), "test")) == 3


def test_split_folders_tar_and_zip_agree(tmp_path):
    root = tmp_path / "tree"
    write_tree(root, {"train/a": 4, "train/b": 4, "test/a": 2, "test/b": 1, "valid/b": 2})
    with tarfile.open(tmp_path / "tree.tar.gz", "w:gz") as tf:
        tf.add(root, arcname="tree")
    with zipfile.ZipFile(tmp_path / "tree.zip", "w") as zf:
        for p in sorted(root.rglob("*.png")):
            zf.write(p, p.relative_to(tmp_path).as_posix())
    loaded = [data.load(str(src), "test") for src in (root, tmp_path / "tree.tar.gz", tmp_path / "tree.zip")]
    for other in loaded[1:]:
        np.testing.assert_array_equal(other.images, loaded[0].images)
        np.testing.assert_array_equal(other.labels, loaded[0].labels)
    assert list(loaded[0].labels) == [0, 0, 1] and len(data.load(str(root), "val")) == 2


def test_npz_with_and_without_labels(tmp_path):
    np.savez(tmp_path / "d.npz", x_train=rng_images(20, 4, 4, 0), y_train=np.arange(20) % 3,
             x_test=rng_images(5, 4, 4, 0), y_test=np.arange(5) % 3)
    test = data.load(str(tmp_path / "d.npz"), "test")
    assert test.images.shape == (5, 4, 4, 3) and test.classes == ["0", "1", "2"]
    np.savez(tmp_path / "u.npz", x_train=rng_images(20, 4, 4, 3))
    unlabelled = data.load(str(tmp_path / "u.npz"), "train")
    assert unlabelled.labels is None
    with pytest.raises(IgptError, match="has no labels"):
        data.load(str(tmp_path / "u.npz"), "train", require_labels=True)
    np.savez(tmp_path / "bad.npz", images=rng_images(2))
    with pytest.raises(IgptError, match="no x_train"):
        data.load(str(tmp_path / "bad.npz"))


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "1", "CMYK", "I;16", "I", "F"])
def test_every_image_mode_becomes_rgb_uint8(tmp_path, mode):
    base = rng_images(1, 5, 7, 3)[0]
    folder = tmp_path / "modes" / "x"
    folder.mkdir(parents=True)
    fmt = "TIFF" if mode in ("I;16", "I", "F", "CMYK") else "PNG"
    image = Image.fromarray(base).convert(mode if mode not in ("I;16", "I", "F") else "L")
    if mode in ("I;16", "I", "F"):
        image = Image.fromarray((np.asarray(image).astype(np.uint16) * 257).astype(np.uint16 if mode == "I;16" else np.int32 if mode == "I" else np.float32))
    image.save(folder / f"img.{fmt.lower()}", format=fmt)
    loaded = data.load(str(tmp_path / "modes"), "train", 5, crop=True)
    assert loaded.images.dtype == np.uint8 and loaded.images.shape == (1, 5, 5, 3)
    if mode in ("L", "LA", "I;16", "I"):
        gray = np.asarray(Image.fromarray(base).convert("L"))
        crop = gray[:, 1:6]
        np.testing.assert_array_equal(loaded.images[0, ..., 0], crop)


def test_box_filter_when_shrinking_and_centre_crop(tmp_path):
    x = rng_images(2, 8, 8, 3)
    np.savez(tmp_path / "d.npz", x_train=x)
    got = data.load(str(tmp_path / "d.npz"), "train", 4).images
    for image, loaded in zip(x, got):
        np.testing.assert_array_equal(loaded, np.asarray(Image.fromarray(image).resize((4, 4), Image.BOX)))
    wide = rng_images(1, 4, 8, 3)
    np.savez(tmp_path / "w.npz", x_train=np.repeat(wide, 2, 0))
    cropped = data.load(str(tmp_path / "w.npz"), "train", 4, crop=True).images[0]
    np.testing.assert_array_equal(cropped, wide[0, :, 2:6])


def test_native_resolution_must_be_uniform(tmp_path):
    write_tree(tmp_path / "mixed", {"a": 2}, size=(6, 6))
    write_tree(tmp_path / "mixed2", {"b": 2}, size=(5, 9))
    (tmp_path / "mixed2" / "b").rename(tmp_path / "mixed" / "b")
    with pytest.raises(IgptError, match="unlike the others: pass --resolution"):
        data.load(str(tmp_path / "mixed"), "train")
    assert data.load(str(tmp_path / "mixed"), "train", 4).images.shape[1:] == (4, 4, 3)


# ---- bad input -------------------------------------------------------------------------------
def test_corrupt_files_are_named_or_skipped(tmp_path):
    write_tree(tmp_path / "d", {"a": 12})
    (tmp_path / "d" / "a" / "zero.png").write_bytes(b"")
    (tmp_path / "d" / "a" / "junk.png").write_bytes(b"this is not a png")
    good = (tmp_path / "d" / "a" / "0.png").read_bytes()
    (tmp_path / "d" / "a" / "cut.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(IgptError, match=r"cannot read image a/(cut|junk|zero)\.png.*--skip-bad"):
        data.load(str(tmp_path / "d"), "train")
    everything = sum(len(data.load(str(tmp_path / "d"), s, skip_bad=True)) for s in data.SPLITS)
    loaded = [data.load(str(tmp_path / "d"), s, skip_bad=True) for s in data.SPLITS]
    assert everything == 12 and sum(s.skipped for s in loaded) == 3
    assert "unreadable files skipped" in next(s for s in loaded if s.skipped).describe()


@pytest.mark.parametrize(
    "spec, match",
    [("imagenet21k", "unknown data set 'imagenet21k'"), ("missing/folder", "data not found"),
     ("empty", "holds no images"), ("file.txt", "not a folder")],
)
def test_bad_data_specs(tmp_path, monkeypatch, spec, match):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("hello")
    with pytest.raises(IgptError, match=match):
        data.load(spec)


def test_flat_folder_has_no_labels(tmp_path):
    write_tree(tmp_path, {"flat": 12})
    images = data.load(str(tmp_path / "flat"), "train")
    assert images.labels is None and images.classes is None
    with pytest.raises(IgptError, match="has no labels"):
        data.load(str(tmp_path / "flat"), "test", require_labels=True)


# ---- caches -------------------------------------------------------------------------------------
def test_caches_are_reused_and_partial_ones_ignored(tmp_path, cache, monkeypatch):
    write_tree(tmp_path / "d", {"a": 6, "b": 6})
    first = data.load(str(tmp_path / "d"), "train")
    palette = Palette(np.random.default_rng(0).uniform(-1, 1, (8, 3)).astype(np.float32))
    tokens = data.load_tokens(str(tmp_path / "d"), "train", None, palette)
    np.testing.assert_array_equal(tokens.tokens, palette.encode(np.asarray(first.images)))
    assert tokens.tokens.dtype == np.uint16 and isinstance(tokens.tokens, np.memmap)
    import igpt.data as module

    def fail(*a, **k):
        raise AssertionError("decoded again")

    monkeypatch.setattr(module, "_build_pixels", fail)
    np.testing.assert_array_equal(data.load(str(tmp_path / "d"), "train").images, first.images)
    monkeypatch.undo()
    monkeypatch.setenv("IGPT_CACHE", str(cache))
    entry = next(p for p in (cache / "pixels").iterdir() if not p.name.startswith("."))
    (entry / "meta.json").unlink()  # as if killed before the entry was complete
    (cache / "pixels" / ".tmp-abc-999999").mkdir()  # a dead process's leftovers
    again = data.load(str(tmp_path / "d"), "train")
    np.testing.assert_array_equal(again.images, first.images)
    (entry / "images.npy").write_bytes(b"garbage")  # damaged arrays are rebuilt too
    np.testing.assert_array_equal(data.load(str(tmp_path / "d"), "train").images, first.images)


# ---- augmentation ---------------------------------------------------------------------------------
def test_random_resized_crop_is_seeded_and_sized():
    images = rng_images(5, 12, 12, 3)
    a = data.random_resized_crop(images, 6, np.random.default_rng(0))
    b = data.random_resized_crop(images, 6, np.random.default_rng(0))
    assert a.shape == (5, 6, 6, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    full = data.random_resized_crop(images, 12, np.random.default_rng(0), scale=(1, 1), ratio=(1, 1))
    np.testing.assert_array_equal(full, images)


def test_pad_crop_flip_keeps_pixels_and_shapes():
    images = rng_images(64, 8, 8, 3)
    out = data.pad_crop_flip(images, np.random.default_rng(1))
    assert out.shape == images.shape
    padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)), mode="reflect")
    flips = 0
    for o, p in zip(out, padded):  # every output is a window of the reflect-padded image, maybe mirrored
        windows = [p[y : y + 8, x : x + 8] for y in range(9) for x in range(9)]
        plain = any(np.array_equal(o, w) for w in windows)
        mirrored = any(np.array_equal(o[:, ::-1], w) for w in windows)
        assert plain or mirrored
        flips += mirrored and not plain
    assert 16 < flips < 48
    centred = data.pad_crop_flip(images, np.random.default_rng(1), pad=0)
    assert all(np.array_equal(o, i) or np.array_equal(o, i[:, ::-1]) for o, i in zip(centred, images))


# ---- the shared copies ----------------------------------------------------------------------------
@pytest.mark.skipif(not (SHARED / "fashion-mnist").exists(), reason="../shared Fashion-MNIST is absent")
def test_shared_fashion_mnist():
    test = data.load("fashion-mnist", "test", data_dir=SHARED / "fashion-mnist")
    assert test.images.shape == (10000, 28, 28, 3) and np.bincount(test.labels).tolist() == [1000] * 10
    assert test.classes[9] == "Ankle boot"


@pytest.mark.skipif(not (SHARED / "cifar10").exists(), reason="../shared CIFAR-10 is absent")
def test_shared_cifar10_archive_streams():
    native = data.open_source(str(SHARED / "cifar10" / "cifar10-jpeg.tar.gz"))
    assert native.classes[:3] == ["airplane", "automobile", "bird"]
    assert len(native.splits["train"].names) == 50000 and len(native.splits["test"].names) == 10000
    first = list(native.splits["test"].read([0, 1, 2]))
    assert [name for name, _ in first] == native.splits["test"].names[:3]
