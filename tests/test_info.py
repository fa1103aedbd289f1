"""`igpt info`: the facts a bug report needs, read without importing the extras or building anything."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from igpt.info import NOT_INSTALLED, caches, cpu, cpuinfo, environment, format_environment, kernels, version_of

CPUINFO = """processor\t: 0
model name\t: Example CPU 9000
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile amx_int8

processor\t: 1
model name\t: Another
"""


def test_the_report_has_versions_cpu_gpu_kernel_and_caches_and_is_json():
    facts = environment()
    assert {"igpt", "packages", "cpu", "gpu", "kernels", "caches"} <= set(facts)
    assert facts["igpt"]["torch"] == torch.__version__
    assert facts["igpt"]["torch build"].split()[0] in ("CPU", "CUDA", "ROCm")
    assert facts["packages"]["required"]["torch"] == torch.__version__
    extras = {name for group, found in facts["packages"].items() if group.startswith("extra ") for name in found}
    assert {"transformers", "torchmetrics", "torch-fidelity", "gradio", "tensorboard", "huggingface_hub"} <= extras
    assert "torchvision" in facts["packages"]["related"]
    assert isinstance(facts["cpu"]["bf16 native"], bool)
    assert json.loads(json.dumps(facts)) == facts
    text = format_environment(facts)
    assert "\n  torch build: " in text and "\n    torch-fidelity: " in text and "bf16 native: " in text


def test_versions_come_from_metadata_without_importing_the_extras():
    code = ("import sys; from igpt.info import environment; environment(); "
            "print([m for m in ('transformers', 'gradio', 'torchmetrics', 'torch_fidelity', 'tensorboard', "
            "'huggingface_hub', 'torchvision') if m in sys.modules])")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
    assert version_of("no-such-package-for-igpt") == NOT_INSTALLED


def test_cpu_flags_are_read_from_the_first_processor_and_missing_where_not_listed():
    entries = cpuinfo(CPUINFO)
    assert entries["model name"] == "Example CPU 9000"
    facts = cpu(entries)
    assert facts["model"] == "Example CPU 9000" and facts["flags"] == ["avx2", "avx512f", "avx512_bf16", "amx_tile"]
    assert cpu({})["flags"] == "not listed on this OS" and cpu({})["model"]


def test_kernel_and_cache_facts_read_the_cache_without_building(tmp_path, monkeypatch):
    monkeypatch.setenv("IGPT_CACHE", str(tmp_path / "cache"))
    assert "not created yet" in caches()["folder"]
    assert kernels()["band kernel"]["built"].startswith("not yet")
    assert kernels()["decode kernel"]["built"].startswith("not yet")
    (tmp_path / "cache" / "kernels").mkdir(parents=True)
    (tmp_path / "cache" / "kernels" / "band_kernel-0123.so").write_bytes(b"x" * 100)
    (tmp_path / "cache" / "pixels" / "digits").mkdir(parents=True)
    (tmp_path / "cache" / "pixels" / "digits" / "train.npy").write_bytes(b"x" * 3 * 1024)
    assert kernels()["band kernel"]["built"] == [str(tmp_path / "cache" / "kernels" / "band_kernel-0123.so")]
    assert caches() == {"folder": str(tmp_path / "cache"), "kernels": "100 B", "pixels": "3.0 KiB", "total": "3.1 KiB"}
    monkeypatch.setenv("IGPT_DECODE_KERNEL", "0")
    assert kernels()["decode kernel"]["enabled"] is False and kernels()["band kernel"]["enabled"] is True


def test_igpt_info_prints_the_report_and_json_on_request(capsys):
    from igpt.cli import main

    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("igpt:\n  igpt: ") and "\ncpu:\n  model: " in text and "\ngpu:\n" in text
    assert main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["igpt"]["torch"] == torch.__version__
