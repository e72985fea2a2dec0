"""The one checkpoint loader: find the source, pick its format adapter, translate keys, load strictly.

Every adapter turns a foreign state dict into our key names (``read_native_state``), returning the source keys it
dropped on purpose alongside. Loading then checks every key: wrong shapes, missing keys and unexpected keys raise one
``WeightLoadError`` that names them (counts and the first few), except keys an adapter declares as expected to be
absent (``allowed_missing``) or unused (``allowed_unexpected``). The ``LoadReport`` lists all of those by name.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.yaml"


class WeightLoadError(RuntimeError):
    """A checkpoint does not fit the model; the message names the keys."""


@dataclass
class LoadReport:
    source: str
    missing: list[str] = field(default_factory=list)  # allowed to be missing (declared by the adapter)
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys unused on purpose (declared by the adapter)

    def summary(self) -> str:
        parts = [f"loaded {self.source}"]
        if self.missing:
            parts.append(f"{len(self.missing)} keys left at their initial values ({_first(self.missing)})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} checkpoint keys not used ({_first(self.unexpected)})")
        return "; ".join(parts)


def _first(keys: list[str], count: int = 5) -> str:
    shown = ", ".join(keys[:count])
    return shown + (f", ... (+{len(keys) - count} more)" if len(keys) > count else "")


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in patterns)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` file or a torch pickle (``.pth``/``.bin``/``.pt``); unwrap ``{"model": ...}``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # not a zip-format file: mmap is unavailable
        state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("model", "state_dict", "module"):
        if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise WeightLoadError(f"{path}: expected a state dict, found {type(state).__name__}")
    return state


def _storage_key(tensor: torch.Tensor) -> tuple:
    if tensor.is_meta:  # no storage to compare: a tied meta parameter is one object under several names
        return ("meta", id(tensor))
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))


def tied_aliases(state: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """For each key, the other keys holding the very same tensor (tied weights: an LLM's lm_head and embeddings).

    Meta tensors are matched by identity, so pass ``state_dict(keep_vars=True)`` for a model with meta parameters.
    """
    groups: dict[tuple, list[str]] = {}
    for key, value in state.items():
        groups.setdefault(_storage_key(value), []).append(key)
    return {key: [other for other in group if other != key] for group in groups.values() for key in group}


def load_into(
    model: torch.nn.Module,
    state: dict[str, torch.Tensor],
    source: str,
    allowed_missing: Iterable[str] = (),
    allowed_unexpected: Iterable[str] = (),
    dropped: Iterable[str] = (),
    preloaded: Iterable[str] = (),
) -> LoadReport:
    """Copy ``state`` (our key names) into ``model``; anything that does not fit raises, naming the keys.

    ``dropped`` are source keys the adapter left out on purpose before translating; the report lists them as unused.
    ``preloaded`` are keys the model already holds from elsewhere (an LLM read from its own folder): they may be
    absent and are not reported. A tied tensor counts as present when one of its names is.

    A tensor the model holds on the meta device (an LLM built empty) adopts the checkpoint's tensor instead of
    copying it (converted to the model's dtype, ties kept); one left on meta after loading raises, naming it.
    """
    expected = model.state_dict(keep_vars=True)  # the tensors themselves: a tied pair is one object, even on meta
    allowed_missing, allowed_unexpected = list(allowed_missing), list(allowed_unexpected)
    mismatched = [
        f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(expected[key].shape)}"
        for key, value in state.items()
        if key in expected and tuple(value.shape) != tuple(expected[key].shape)
    ]
    if mismatched:
        raise WeightLoadError(f"{source}: {len(mismatched)} tensors have the wrong shape: {_first(mismatched, 3)}")
    aliases = tied_aliases(expected)
    missing = [
        key for key in expected
        if key not in state and not any(alias in state for alias in aliases.get(key, ()))
        and not _matches(key, preloaded)
    ]
    unexpected = [key for key in state if key not in expected]
    bad_missing = [key for key in missing if not _matches(key, allowed_missing)]
    bad_unexpected = [key for key in unexpected if not _matches(key, allowed_unexpected)]
    if bad_missing or bad_unexpected:
        problems = []
        if bad_missing:
            problems.append(f"{len(bad_missing)} missing keys: {_first(bad_missing)}")
        if bad_unexpected:
            problems.append(f"{len(bad_unexpected)} unexpected keys: {_first(bad_unexpected)}")
        raise WeightLoadError(f"{source} does not fit {type(model).__name__}: " + "; ".join(problems))
    adopted: set[tuple] = set()
    with torch.no_grad():
        for key, value in state.items():
            if key not in expected:
                continue
            target = expected[key]
            if not target.is_meta:
                target.copy_(value.to(target.dtype))
                continue
            value = value.to(target.dtype)
            if _storage_key(value) in adopted:  # one checkpoint tensor under two untied names: each gets its own
                value = value.clone()
            adopted.add(_storage_key(value))
            _adopt(model, [key, *aliases.get(key, ())], value, expected)
    _check_no_meta(model, source)
    report = LoadReport(source, missing, unexpected + list(dropped))
    if report.missing or report.unexpected:
        logger.info(report.summary())
    return report


def _adopt(model: torch.nn.Module, names: list[str], value: torch.Tensor, expected: dict[str, torch.Tensor]) -> None:
    """Make ``value`` itself (no copy) the tensor behind ``names`` (one tied meta tensor), keeping it a parameter
    with the same ``requires_grad``, or a buffer; ``expected`` is updated to the new tensor."""
    placeholder = expected[names[0]]
    is_parameter = isinstance(placeholder, torch.nn.Parameter)
    tensor = torch.nn.Parameter(value, requires_grad=placeholder.requires_grad) if is_parameter else value
    for name in names:
        module_name, _, attribute = name.rpartition(".")
        module = model.get_submodule(module_name)
        (module._parameters if is_parameter else module._buffers)[attribute] = tensor
        expected[name] = tensor


def _check_no_meta(model: torch.nn.Module, source: str) -> None:
    """No tensor may pass for loaded while it has no values: a meta parameter or buffer left after loading raises."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    empty = sorted(name for name, tensor in tensors if tensor.is_meta)
    if empty:
        raise WeightLoadError(
            f"{source}: {len(empty)} tensors of {type(model).__name__} got no values from the checkpoint (they are "
            f"still on the meta device): {_first(empty)}"
        )


def save_pretrained(
    model: torch.nn.Module, directory: str | os.PathLike, config=None, skip_prefixes: tuple[str, ...] = ()
) -> None:
    """Write ``config.yaml`` + ``model.safetensors`` atomically: a crash never leaves a half-written folder.

    ``config`` replaces ``model.config`` in the YAML; keys starting with ``skip_prefixes`` are not written. Of tied
    tensors only the first name is written (safetensors stores no shared memory; loading fills the others).
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        (config or model.config).to_yaml(staging / CONFIG_NAME)
        state = _untied({key: value for key, value in model.state_dict().items() if not key.startswith(skip_prefixes)})
        state = {key: value.detach().cpu().contiguous() for key, value in state.items()}
        save_file(state, str(staging / WEIGHTS_NAME), metadata={"format": "pt", "library": "blip2"})
        if directory.exists():
            backup = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(backup, ignore_errors=True)
            directory.rename(backup)
            staging.rename(directory)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            staging.rename(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _untied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    seen: set[tuple] = set()
    out = {}
    for key, value in state.items():
        storage = _storage_key(value)
        if storage not in seen:
            seen.add(storage)
            out[key] = value
    return out


def load_pretrained(cls, name_or_path: str | os.PathLike, config=None, **kwargs):
    """Build ``cls`` from a preset name, our folder, a Hugging Face BLIP-2 folder or a LAVIS ``.pth``."""
    from blip2 import registry
    from blip2.weights import adapters

    name = str(name_or_path)
    if name in registry.PRESETS:
        preset = registry.get_preset(name)
        if not preset.files:
            model = cls(config or preset.config())
            logger.info("preset %s has no weight files: random initialisation", name)
            return model
        message = registry.missing_files_message(preset)
        if message:
            raise FileNotFoundError(message)
        path = preset.weights_directory()
        if preset.llm:  # stage 2: the preset's config names the LLM folder under this BLIP2_HOME
            config = config or preset.config()
    else:
        path = Path(name).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"{name!r} is neither an existing file or folder nor a preset; presets: {', '.join(registry.PRESETS)}"
            )
    return load_with_adapter(cls, adapters.detect(path), path, config=config, **kwargs)


def load_with_adapter(cls, adapter, path: Path, config=None, **kwargs):
    """Build ``cls`` from ``path`` read by ``adapter``; the config comes from the source unless one is given.

    The checkpoint is read first: a stage-2 LLM it holds is then built empty and adopts its tensors, rather than being
    initialised randomly and overwritten.
    """
    from blip2.weights import stage2

    config = config or adapter.read_config(path, **kwargs)
    state, dropped = adapter.read_native_state(path, config, **kwargs)
    model = cls(config, **stage2.build_options(cls, config, state))
    allowed_missing, preloaded = list(adapter.allowed_missing(model)), []
    if hasattr(model, "language_model"):  # stage 2: a stage-1 start, or an LLM from its own folder
        state, dropped, allowed_missing, preloaded = stage2.fit_state(model, state, dropped, allowed_missing, str(path))
    report = load_into(
        model, state, source=str(path), allowed_missing=allowed_missing,
        allowed_unexpected=adapter.allowed_unexpected(model), dropped=dropped, preloaded=preloaded,
    )
    model.load_report = report
    if hasattr(model, "apply_freezing"):
        model.apply_freezing()
    return model
