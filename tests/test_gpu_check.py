"""bench/gpu_check.py --dry-run: every step of the GPU check runs on the CPU at toy sizes and the table lists them,
so the script works the day a GPU is lent."""

import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
ROWS = ("pytest -m cuda", "bench_model: forward+backward", "bench_train: igpt train step", "bench_sample: sampling",
        "igpt train", "igpt sample")


def tiny_image_folder_tarball(path: Path) -> Path:
    """train/<class>/*.jpg and test/<class>/*.jpg, like the CIFAR-10 archive the GPU run reads."""
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w:gz") as tar:
        for split, count in (("train", 16), ("test", 4)):
            for label in ("dark", "light"):
                for i in range(count):
                    base = 60 if label == "dark" else 190
                    pixels = np.clip(base + rng.integers(-50, 50, (8, 8, 3)), 0, 255).astype(np.uint8)
                    encoded = io.BytesIO()
                    Image.fromarray(pixels).save(encoded, format="JPEG")
                    member = tarfile.TarInfo(f"{split}/{label}/{i:04d}.jpg")
                    member.size = encoded.tell()
                    encoded.seek(0)
                    tar.addfile(member, encoded)
    return path


@pytest.mark.slow
def test_dry_run_runs_every_step_and_prints_the_summary_table(tmp_path):
    data = tiny_image_folder_tarball(tmp_path / "images.tar.gz")
    out = tmp_path / "out"
    env = {**os.environ, "IGPT_CACHE": str(tmp_path / "cache")}
    env.pop("OUT", None)
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", str(data),
                           "--out", str(out), "--work", str(tmp_path / "work"), "--no-install"],
                          capture_output=True, text=True, env=env, timeout=900)
    table = done.stdout[done.stdout.rindex("GPU check summary"):].splitlines()
    assert re.split(r"\s{2,}", table[1])[:3] == ["step", "status", "time"], done.stdout[-3000:]
    rows = {cells[0]: cells for cells in (re.split(r"\s{2,}", line) for line in table[3:])}
    for name in ROWS:
        steps = [step for step in rows if step.startswith(name)]
        assert steps, f"no {name} row in\n" + "\n".join(table)
        assert all(rows[step][1] == "ok" for step in steps), "\n".join(table) + "\n" + done.stdout[-5000:]
    assert done.returncode == 0, done.stdout[-5000:]
    assert (out / "summary.txt").read_text().splitlines() == table
    results = json.loads((out / "results.json").read_text())
    assert all(row["tokens_per_s"] > 0 for row in results["rows"] if row["step"].startswith("bench_"))
    assert {"gpu_check.log", "bench_model.json", "bench_train.json", "bench_sample.json", "samples.png"} <= {
        path.name for path in out.iterdir()}
