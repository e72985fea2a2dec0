"""Files that ship inside the package: the run YAMLs (``blip2/configs/blip2/``). Imports nothing from blip2, so
every layer may ask for them; they are found beside this module, in a source checkout and in an installed wheel."""

from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "configs" / "blip2"


def config_file(name: str) -> Path:
    """The shipped run YAML called ``name`` (e.g. ``run_blip2_quickstart.yaml``)."""
    path = CONFIG_DIR / name
    if not path.is_file():
        shipped = ", ".join(sorted(p.name for p in CONFIG_DIR.glob("*.yaml")))
        raise FileNotFoundError(f"no shipped config {name!r}; the package holds: {shipped}")
    return path
