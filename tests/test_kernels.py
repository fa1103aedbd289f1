"""igpt's C++ kernels (igpt/kernels.py): each built once into the cache, a damaged library built again and never
mapped, PyTorch's operators serving wherever one cannot be built, and the process's floating point left alone."""

from pathlib import Path

import pytest
import torch

from conftest import masked_dense, random_model
from igpt import kernels
from igpt.attention import band_attention, band_kernel
from igpt.decoding import Decoder
from igpt.decoding import KERNEL as DECODE_KERNEL


def band_runs() -> bool:
    """Band attention of 16 keys (rows of 8) over 40 positions against masked SDPA; whether the kernel computed it."""
    q = torch.randn(1, 2, 40, 16, requires_grad=True)
    out = band_attention(q, q, q, 16, 8)
    torch.testing.assert_close(out, masked_dense(q, q, q, 16), atol=1e-5, rtol=1e-5)
    return "igpt_band_forward" in out.grad_fn.name()


@torch.no_grad()
def decode_runs() -> bool:
    """Ten one-pixel steps against the full forward; whether the kernel took them."""
    model = random_model()
    tokens = torch.randint(0, 13, (2, 12))
    full = model(tokens)
    decoder = Decoder(model, 2)
    decoder.feed(tokens[:, :1])
    for i in range(1, 11):
        torch.testing.assert_close(decoder.feed(tokens[:, i : i + 1]), full[:, i + 1], atol=1e-4, rtol=0)
    return decoder.kernel_step is not None


KERNELS = {"band": (band_kernel.KERNEL, band_runs), "decode": (DECODE_KERNEL, decode_runs)}


@pytest.fixture(params=KERNELS)
def kernel(request):
    """Each kernel and its check, looked up again under the test's environment and again after it."""
    kernel, runs = KERNELS[request.param]
    kernel.forget()
    yield kernel, runs
    kernel.forget()


def test_a_kernel_is_built_once_into_the_cache(kernel, tmp_path, monkeypatch):
    kernel, runs = kernel
    monkeypatch.setenv("IGPT_CACHE", str(tmp_path))
    try:
        path = kernel.build()
    except (OSError, kernels.subprocess.SubprocessError):
        pytest.skip("no C++ compiler here")
    record = kernels.build_record(path)
    assert path.parent == tmp_path / "kernels" and sorted(path.parent.iterdir()) == sorted([path, record])
    built = path.stat().st_mtime_ns
    assert kernel.build() == path and path.stat().st_mtime_ns == built
    assert kernel.available() and runs()


@pytest.fixture
def cache_with_a_built_kernel(kernel, tmp_path, monkeypatch):
    """An igpt cache holding this machine's build of the kernel, and a compiler stand-in that "builds" it again
    by copying it (the tests of what happens around a build need no minute of compiling)."""
    kernel, runs = kernel
    if not kernel.available():
        pytest.skip(f"no C++ compiler builds igpt's {kernel.name} here")
    good = kernel.build()
    monkeypatch.setenv("IGPT_CACHE", str(tmp_path))
    path = tmp_path / "kernels" / good.name
    path.parent.mkdir()
    path.write_bytes(good.read_bytes())
    kernels.build_record(path).write_text(kernels.build_record(good).read_text())
    builds = []

    def compiler(command, **options):
        builds.append(command)
        Path(command[-1]).write_bytes(good.read_bytes())

    monkeypatch.setattr(kernels.subprocess, "run", compiler)
    kernel.forget()
    return kernel, runs, path, builds


@pytest.mark.parametrize("damage", ["truncated", "garbage", "no record"])
def test_a_damaged_kernel_is_built_again_never_loaded(damage, cache_with_a_built_kernel, caplog):
    """A library cut short (a full disk, an interrupted copy) or overwritten would kill the process with a
    bus error when mapped: it fails its build record, is built again with one log line, and runs."""
    kernel, runs, path, builds = cache_with_a_built_kernel
    assert kernel.build() == path and not builds  # intact: loaded as it is
    whole = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(whole[: len(whole) // 2])
    elif damage == "garbage":
        path.write_bytes(bytes(range(256)) * (len(whole) // 256))
    else:
        kernels.build_record(path).unlink()
    assert not kernels.intact(path)
    with caplog.at_level("WARNING", logger=kernels.log.name):
        assert kernel.available()
    assert len(builds) == 2 and kernels.intact(path) and path.read_bytes() == whole
    assert len([r for r in caplog.records if "does not match its build record" in r.message]) == 1
    assert runs()


def test_a_damaged_kernel_that_cannot_be_rebuilt_falls_back(cache_with_a_built_kernel, monkeypatch):
    """With no compiler to build it again, a damaged library is never mapped and PyTorch's operators serve."""
    kernel, runs, path, _ = cache_with_a_built_kernel
    path.write_bytes(path.read_bytes()[:1000])

    def failing(command, **options):
        raise kernels.subprocess.CalledProcessError(1, command, stderr="the compiler is gone")

    monkeypatch.setattr(kernels.subprocess, "run", failing)
    assert not kernel.available()
    assert not runs()


@pytest.mark.parametrize("environment", ["no compiler", "turned off"])
def test_without_a_compiler_nothing_is_left_in_the_cache(environment, kernel, tmp_path, monkeypatch):
    """A compiler that fails (or IGPT_<NAME>=0) leaves PyTorch's operators, with the same results, and nothing
    half-built in the cache."""
    kernel, runs = kernel
    monkeypatch.setenv("IGPT_CACHE", str(tmp_path))
    monkeypatch.setenv(*(("CXX", "false") if environment == "no compiler" else (kernel.switch, "0")))
    assert not kernel.available()
    assert not runs()
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


@pytest.mark.parametrize("name", KERNELS)
def test_loading_a_kernel_leaves_the_process_floating_point_alone(name):
    """-ffast-math on GCC 12's link line adds crtfastmath.o, which turns on flush-to-zero for the
    whole process when the library loads: the kernels are compiled with it and linked without."""
    kernel, runs = KERNELS[name]
    if not kernel.available():
        pytest.skip(f"no C++ compiler builds igpt's {kernel.name} here")
    assert runs()
    assert (torch.tensor([1e-40]) * 1.0).item() != 0.0  # a subnormal survives
