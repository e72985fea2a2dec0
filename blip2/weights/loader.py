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
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from blip2 import files

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
            parts.append(f"{len(self.missing)} keys left at their initial values ({first_keys(self.missing)})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} checkpoint keys not used ({first_keys(self.unexpected)})")
        return "; ".join(parts)


def first_keys(keys: list[str], count: int = 5) -> str:
    shown = ", ".join(keys[:count])
    return shown + (f", ... (+{len(keys) - count} more)" if len(keys) > count else "")


def matches_any(key: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in patterns)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` file or a torch pickle (``.pth``/``.bin``/``.pt``); unwrap ``{"model": ...}``.

    Torch files are read with ``weights_only=True``: one that holds objects beyond tensors and plain containers is
    refused (unpickling them could run code). A file that cannot be read raises ``WeightLoadError`` naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except SafetensorError as error:
            raise WeightLoadError(f"{path}: truncated or not a safetensors file ({_one_line(error)})") from None
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # not a zip-format file: mmap is unavailable
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, MemoryError):
        raise
    except pickle.UnpicklingError as error:
        refused = _REFUSED_GLOBAL.search(str(error))
        if refused:
            raise WeightLoadError(
                f"{path} holds objects beyond tensors ({refused.group(1)}): refusing to unpickle them, as that could "
                "run code; re-save the checkpoint as a plain state dict of tensors (or safetensors)"
            ) from None
        raise WeightLoadError(f"{path}: not a readable torch checkpoint ({_torch_reason(error)})") from None
    except Exception as error:  # torch raises RuntimeError, EOFError, KeyError, ... for a truncated or foreign file
        reason = _torch_reason(error)
        kind = type(error).__name__
        raise WeightLoadError(
            f"{path}: truncated or not a torch checkpoint ({kind if reason == kind else f'{kind}: {reason}'})"
        ) from None
    for wrapper in ("model", "state_dict", "module"):
        if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise WeightLoadError(f"{path}: expected a state dict, found {type(state).__name__}")
    return state


_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _torch_reason(error: BaseException) -> str:
    """The useful part of torch.load's message: its first sentence for a broken zip, the last line of a
    weights-only refusal (its header is advice for trusted files)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if lines[0].startswith("Weights only load failed"):
        reasons = [line for line in lines if not line.startswith(("Weights only", "Check the documentation", "("))]
        return _one_line(reasons[-1] if reasons else lines[0])
    return _one_line(lines[0].split(". ")[0])


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
    _check_shapes(expected, state, source)
    allowed_missing, allowed_unexpected, preloaded = list(allowed_missing), list(allowed_unexpected), list(preloaded)
    aliases = tied_aliases(expected)
    missing = [
        key for key in expected
        if key not in state and not any(alias in state for alias in aliases.get(key, ()))
        and not matches_any(key, preloaded)
    ]
    unexpected = [key for key in state if key not in expected]
    _check_keys(type(model).__name__, source, [key for key in missing if not matches_any(key, allowed_missing)],
                [key for key in unexpected if not matches_any(key, allowed_unexpected)])
    _copy_state(model, state, expected, aliases)
    _check_no_meta(model, source)
    report = LoadReport(source, missing, unexpected + list(dropped))
    if report.missing or report.unexpected:
        logger.info(report.summary())
    return report


def _check_shapes(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: str) -> None:
    mismatched = [
        f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(expected[key].shape)}"
        for key, value in state.items()
        if key in expected and tuple(value.shape) != tuple(expected[key].shape)
    ]
    if mismatched:
        raise WeightLoadError(f"{source}: {len(mismatched)} tensors have the wrong shape: {first_keys(mismatched, 3)}")


def _check_keys(model_name: str, source: str, bad_missing: list[str], bad_unexpected: list[str]) -> None:
    problems = []
    if bad_missing:
        problems.append(f"{len(bad_missing)} missing keys: {first_keys(bad_missing)}")
    if bad_unexpected:
        problems.append(f"{len(bad_unexpected)} unexpected keys: {first_keys(bad_unexpected)}")
    if problems:
        raise WeightLoadError(f"{source} does not fit {model_name}: " + "; ".join(problems))


def _copy_state(model: torch.nn.Module, state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                aliases: dict[str, list[str]]) -> None:
    """Copy into real tensors; a meta tensor adopts the checkpoint's (in the model's dtype, ties kept)."""
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
            f"still on the meta device): {first_keys(empty)}"
        )


def save_pretrained(
    model: torch.nn.Module, directory: str | os.PathLike, config=None, skip_prefixes: tuple[str, ...] = (),
    overwrite: bool = False,
) -> None:
    """Write ``config.yaml`` + ``model.safetensors`` into ``directory``, each atomically (``blip2.files``).

    Only our own files are ever replaced and nothing is deleted: a folder holding files blip2 did not write is refused
    unless ``overwrite`` (which still keeps those files), and an output that is a regular file is always refused.
    ``config`` replaces ``model.config`` in the YAML; keys starting with ``skip_prefixes`` are not written. Of tied
    tensors only the first name is written (safetensors stores no shared memory; loading fills the others).
    """
    directory = files.prepare_output_folder(directory, overwrite)
    state = _untied({key: value for key, value in model.state_dict().items() if not key.startswith(skip_prefixes)})
    state = {key: value.detach().cpu().contiguous() for key, value in state.items()}
    files.write_files(directory, {
        WEIGHTS_NAME: lambda path: save_file(state, str(path), metadata={"format": "pt", "library": "blip2"}),
        CONFIG_NAME: (config or model.config).to_yaml,
    })


def _untied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    seen: set[tuple] = set()
    out = {}
    for key, value in state.items():
        storage = _storage_key(value)
        if storage not in seen:
            seen.add(storage)
            out[key] = value
    return out
