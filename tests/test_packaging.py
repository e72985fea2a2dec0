"""Issue 11: the run YAMLs and the bert-base-uncased vocabulary ship as package data, and ``blip2 demo`` works from a
wheel installed into a fresh virtual environment (not the editable checkout).

The wheel is built from a copy of the checkout, so the build writes nothing (``build/``, ``*.egg-info``) into the
working tree. The venv sees the system site-packages for torch, transformers and the rest; the editable install of
the checkout that may live there is only a fallback finder (after the path finders), so the venv's own ``blip2``
wins, which the slow test checks before running the demo.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from blip2 import resources

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "blip2"
VOCAB = "blip2/processing/bert_base_uncased_vocab.txt"
BUILD_FILES = ("pyproject.toml", "README.md", "setup.py", "setup.cfg", "MANIFEST.in", "LICENSE")


def clean_env() -> dict[str, str]:
    """The environment without anything that would put the checkout on ``sys.path``."""
    return {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """``pip wheel`` of a copy of the checkout (no network, no build isolation: the installed setuptools builds it)."""
    pytest.importorskip("setuptools")
    root = tmp_path_factory.mktemp("wheel")
    source = root / "src"
    shutil.copytree(PACKAGE, source / "blip2", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in BUILD_FILES:
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, source / name)
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                             "--wheel-dir", str(root / "dist"), str(source)],
                            capture_output=True, text=True, timeout=600, env=clean_env())
    assert result.returncode == 0, result.stdout + result.stderr
    wheels = list((root / "dist").glob("blip2-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_the_wheel_ships_every_module_config_and_the_vocabulary(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = sorted(path.name for path in resources.CONFIG_DIR.glob("*.yaml"))
    assert "run_blip2_quickstart.yaml" in configs and "run_blip2_tiny_own_data.yaml" in configs, configs
    missing = [f"blip2/configs/blip2/{name}" for name in configs if f"blip2/configs/blip2/{name}" not in names]
    modules = [path.relative_to(ROOT).as_posix() for path in PACKAGE.rglob("*.py") if "__pycache__" not in path.parts]
    missing += [module for module in modules if module not in names]  # a sub-package left out of packages.find
    assert VOCAB in names
    assert not missing, missing
    with zipfile.ZipFile(wheel) as archive:
        assert archive.read(VOCAB) == (ROOT / VOCAB).read_bytes()
        entry_points = archive.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert re.search(r"^blip2 = blip2\.cli\b", entry_points, re.MULTILINE), entry_points  # the `blip2` command


def test_config_file_finds_a_shipped_config_beside_the_package_and_names_them_for_an_unknown_one():
    path = resources.config_file("run_blip2_quickstart.yaml")
    assert path.is_file() and path.parent == PACKAGE.resolve() / "configs" / "blip2"
    with pytest.raises(FileNotFoundError, match="run_blip2_quickstart.yaml"):
        resources.config_file("run_blip2_nonexistent.yaml")


@pytest.mark.slow
def test_blip2_demo_runs_from_a_wheel_installed_in_a_fresh_venv(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True,
                   timeout=300)
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = bin_dir / "python"
    env = clean_env()
    install = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--force-reinstall",
                              str(wheel)], capture_output=True, text=True, timeout=600, env=env)
    assert install.returncode == 0, install.stdout + install.stderr

    work = tmp_path / "elsewhere"  # not the checkout: a blip2/ beside the working directory would shadow the wheel
    work.mkdir()
    where = subprocess.run([str(python), "-c", "import blip2, blip2.resources as r, blip2.processing.tokenizer as t;"
                            "print(blip2.__file__); print(r.config_file('run_blip2_quickstart.yaml'));"
                            "print(t.DEFAULT_VOCAB_FILE)"],
                           cwd=work, capture_output=True, text=True, timeout=300, env=env)
    assert where.returncode == 0, where.stderr
    site = venv.resolve()
    for line in where.stdout.split():
        assert Path(line).resolve().is_relative_to(site), f"{line} is not the wheel's copy under {site}"

    # the fewest stage-1 steps the CLI takes; stage 2 skipped; data, training, evaluation and the report all run
    demo = subprocess.run([str(bin_dir / "blip2"), "demo", "--stage2_steps", "0", "--steps", "2", "--device", "cpu",
                           "--output_dir", "demo_out"], cwd=work, capture_output=True, text=True, timeout=1500,
                          env=env)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    out = work / "demo_out"
    report = (out / "report.md").read_text(encoding="utf-8")
    for heading in ("Image-text retrieval", "Zero-shot classification", "Predictions on held-out images"):
        assert heading in report, report
    assert (out / "loss_curves.png").is_file()
    vocab = (out / "shapes" / "vocab.txt").read_text(encoding="utf-8").splitlines()
    full = (ROOT / VOCAB).read_text(encoding="utf-8").splitlines()
    assert 100 < len(vocab) < len(full) and vocab[:104] == full[:104]  # trimmed from the packaged vocabulary
