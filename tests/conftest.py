"""Shared test setup: one cache for the whole session, and one tiny pretraining run.

Every test (and every subprocess it starts) reads and writes data caches under one
session-wide IGPT_CACHE, never the user's ~/.cache/igpt.
"""

from __future__ import annotations

import shutil

import pytest

TINY = {"n_layer": 2, "n_embd": 32, "n_head": 2}  # a two-layer, width-32 model: seconds to train
PAPER = {"positions": "1d", "attention": "dense"}  # the paper's architecture; the defaults are 2-D and strided
PAPER_FLAGS = [arg for name, value in PAPER.items() for arg in (f"--{name}", value)]  # for `igpt train` beside TINY_RUN
# fp32: the tests compare runs at float32's tolerances (exact resume, accumulation, processes); bf16 tests say so
TINY_RUN = dict(batch_size=32, steps=12, lr=3e-3, eval_every=6, save_every=4, sample_every=12, eval_batches=2,
                precision="fp32", **TINY,
                **PAPER)


@pytest.fixture(scope="session", autouse=True)
def igpt_cache(tmp_path_factory):
    """The session's cache, with igpt's kernels built into it first: a test that points IGPT_CACHE elsewhere for
    its data then finds them loaded, and subprocesses find them built."""
    import igpt.decoding  # noqa: F401  (defines the decode kernel; the band kernel comes with it)
    from igpt.kernels import KERNELS

    with pytest.MonkeyPatch.context() as patch:
        cache = tmp_path_factory.mktemp("igpt-cache")
        patch.setenv("IGPT_CACHE", str(cache))
        for kernel in KERNELS:
            kernel.library()
        yield cache


def pretraining(data: str = "digits", **changes):
    """A pretraining task on `data` at 8x8 with the tiny run's settings, changed by `changes`
    (DataConfig and PretrainConfig fields)."""
    import dataclasses

    from igpt.data import DataConfig
    from igpt.pretrain import PretrainConfig, Pretraining

    data_fields = {field.name for field in dataclasses.fields(DataConfig)}
    described = {"name": data, "resolution": 8, **{k: v for k, v in changes.items() if k in data_fields}}
    settings = {**TINY_RUN, **{k: v for k, v in changes.items() if k not in data_fields}}
    return Pretraining(DataConfig(**described), PretrainConfig(**settings))


def train(out, resume: bool = False, **changes):
    """Train (or resume) a tiny run into `out`; returns the folder."""
    from igpt.train import Trainer

    Trainer(pretraining(**changes), out, resume=resume, log=lambda *_: None, progress=False).run()
    return out


STEPS = ("eager", "kernel", "static")  # Decoder's one-pixel steps on a CPU (the compiled one: test_cuda.py)


def step_decoder(model, batch: int, step: str):
    """A Decoder whose one-pixel steps take `step`'s form; the kernel's skip where no C++ compiler builds it."""
    from igpt.decoding import KERNEL, Decoder

    if step == "kernel" and not KERNEL.available():
        pytest.skip("no C++ compiler builds igpt's decode kernel here")
    decoder = Decoder(model, batch, static=step == "static", kernel=step == "kernel")
    assert (decoder.kernel_step is not None) == (step == "kernel")
    return decoder


def random_model(objective: str = "ar", **changes):
    """A 3-layer model on 5x5 images whose weights are all perturbed (the released init zeroes the head),
    so every output depends on every weight."""
    import torch

    from igpt.model import ImageGPT, ImageGPTConfig

    torch.manual_seed(0)
    config = dict(vocab_size=13, n_ctx=25, n_embd=32, n_layer=3, n_head=4, objective=objective)
    model = ImageGPT(ImageGPTConfig(**{**config, **changes}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def band_mask(t: int, window: int):
    """The band written out on its own: query i sees the keys i - window < j <= i (True where it attends)."""
    import torch

    i, j = torch.arange(t)[:, None], torch.arange(t)
    return (j <= i) & (j > i - window)


def masked_dense(q, k, v, window: int):
    """Band attention as PyTorch's SDPA under `band_mask`: the reference the kernels are held to."""
    import torch.nn.functional as F

    return F.scaled_dot_product_attention(q, k, v, attn_mask=band_mask(q.shape[2], window))


def qkv_outputs_and_gradients(attend, qkv, grad, heads: int, layout: str = "model"):
    """attend's output and the gradient of the (B, t, 3 x width) product that q, k and v come from,
    as (B, heads, t, head_dim): views of it as the model makes them ("model"), contiguous copies, or
    ("every other") with head_dim at stride 2."""
    b, t, width = qkv.shape
    x = qkv.clone().requires_grad_()
    q, k, v = (y.view(b, t, heads, width // 3 // heads).transpose(1, 2) for y in x.split(width // 3, dim=-1))
    if layout == "contiguous":
        q, k, v = (y.contiguous() for y in (q, k, v))
    if layout == "every other":
        q, k, v = (y.repeat_interleave(2, dim=-1)[..., ::2] for y in (q, k, v))
    out = attend(q, k, v)
    out.backward(grad)
    return out.detach(), x.grad


KILLED_AT_STEP_10 = (
    "import os, signal, sys\n"
    "from igpt.checkpoint import RunFolder\n"
    "log = RunFolder.log_metrics\n"
    "def killing(self, record):\n"
    "    log(self, record)\n"
    "    if record.get('step') == 10: os.kill(os.getpid(), signal.SIGKILL)\n"
    "RunFolder.log_metrics = killing\n"
    "from igpt.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)  # `python -c KILLED_AT_STEP_10 COMMAND ...`: the igpt command, SIGKILLed once it has logged step 10


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A finished tiny run on digits 8x8 (12 steps, 17-colour palette). Read it, never change it: see `tiny_copy`."""
    return train(tmp_path_factory.mktemp("tiny") / "run")


@pytest.fixture
def tiny_copy(tiny_run, tmp_path):
    """A private copy of the tiny run, for tests that change or damage it."""
    return shutil.copytree(tiny_run, tmp_path / "run")


def run_refused(argv: list[str], cwd, monkeypatch, capsys) -> str:
    """Run `igpt` in the empty folder `cwd`: it must refuse with a non-zero exit and one line on stderr
    (no traceback), leaving nothing behind; returns that line."""
    from igpt.cli import main

    monkeypatch.chdir(cwd)
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own refusals
        code = exit_.code
    err = capsys.readouterr().err.strip()
    assert code not in (0, None), argv
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert list(cwd.iterdir()) == [], f"{argv} left {list(cwd.iterdir())}"
    return err


SERVE_COUNTING_STEPS = (
    "import os, sys, time\n"
    "from igpt.decoding import Decoder\n"
    "def counted(call, steps):\n"
    "    def slowed(self, *args, **kwargs):\n"
    "        time.sleep(steps(*args) * float(os.environ['IGPT_TEST_STEP_SECONDS']))\n"
    "        with open(os.environ['IGPT_TEST_STEPS'], 'a') as f:\n"
    "            f.write('.' * steps(*args))\n"
    "        return call(self, *args, **kwargs)\n"
    "    return slowed\n"
    "Decoder.feed = counted(Decoder.feed, lambda tokens: 1)\n"
    "Decoder.feed_and_draw = counted(Decoder.feed_and_draw, lambda out, steps, *rest: steps)\n"
    "from igpt.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)  # `python -c SERVE_COUNTING_STEPS serve ...`: igpt serve, each decoding step (either form) slowed down and counted


class Served:
    """`igpt serve --ckpt RUN` in a subprocess on a free port, with a home, a temporary folder and a working
    folder (root/cwd, where a relative RUN is found) of its own, so a test can see that it leaves nothing
    behind. Each decoding step takes at least `step_seconds` and adds a byte to `steps` (a completion can
    then be stopped half-way)."""

    def __init__(self, run, root, *args: str, step_seconds: float = 0.0, startup_seconds: float = 180.0):
        import os
        import socket
        import subprocess
        import sys
        import threading
        import time
        from pathlib import Path

        self.root = root
        self.home, self.tmp, self.cwd = root / "home", root / "tmp", root / "cwd"
        for folder in (self.home, self.tmp, self.cwd):
            folder.mkdir(parents=True, exist_ok=True)
        self.steps = root / "steps"
        self.steps.write_text("")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        import igpt

        source = str(Path(igpt.__file__).parents[1])  # the igpt these tests import, whatever the working folder
        paths = [source, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "HOME": str(self.home), "TMPDIR": str(self.tmp),
               "GRADIO_ANALYTICS_ENABLED": "False",
               "IGPT_TEST_STEPS": str(self.steps), "IGPT_TEST_STEP_SECONDS": str(step_seconds),
               "OMP_NUM_THREADS": "1"}
        env.setdefault("MPLCONFIGDIR", str(root.parent / "matplotlib"))  # matplotlib's own cache, not the server's
        self.proc = subprocess.Popen([sys.executable, "-c", SERVE_COUNTING_STEPS, "serve", "--ckpt", str(run),
                                      "--port", str(self.port), *args], cwd=self.cwd, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: list[str] = []
        started = threading.Event()

        def read() -> None:
            for line in self.proc.stdout:
                self.lines.append(line)
                if line.startswith("igpt serve: http"):
                    started.set()
            started.set()

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + startup_seconds
        while not started.wait(0.2) and time.monotonic() < deadline:
            pass
        if self.proc.poll() is not None or not any(line.startswith("igpt serve: http") for line in self.lines):
            self.stop()
            raise AssertionError("igpt serve did not start:\n" + "".join(self.lines))
        self.url = f"http://127.0.0.1:{self.port}/"

    def client(self, folder):
        from gradio_client import Client

        return Client(self.url, verbose=False, download_files=str(folder))

    def stop(self, timeout: float = 30.0) -> tuple[int | None, float]:
        """SIGTERM; the exit code (None if it had to be killed) and the seconds it took."""
        import signal
        import subprocess
        import time

        start = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            code = None
        return code, time.monotonic() - start
