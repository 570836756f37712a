"""Checks that a config and a checkpoint make an MMDetection model: run as a child process.

    python -m trainer_worker.verify CONFIG CHECKPOINT

Prints one JSON line: {"ok": true, "num_classes": N, "parameter_count": P} or
{"ok": false, "errors": {"config" | "checkpoint": "what is wrong"}}. The services
call it in a child so that they never import torch or mmdet themselves.

Checkpoints are loaded with `weights_only=True`: an uploaded file is untrusted and a
full unpickle runs arbitrary code. mmengine's own checkpoints carry a few non-tensor
objects (its message hub's HistoryBuffer, numpy scalars, and `getattr` to fetch
HistoryBuffer's statistic methods); exactly those are allowed, `getattr` only on
HistoryBuffer's public attributes, so such checkpoints load without trusting them.

The config is never executed: `shared.model_config` reads it as data (the service
checked it the same way before starting this child); only the mmdet configs it names
as `_base_`, shipped with mmdet, are loaded by mmengine.
"""

from __future__ import annotations

import ctypes
import json
import sys
from collections.abc import Mapping
from typing import Any

# How many missing or unexpected keys an error names before it summarises.
_SHOWN_KEYS = 5
# unshare(2) flags: a user namespace (allowed without privileges where the kernel permits
# it) holding a network namespace with no interface up.
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000


def _history_buffer_getattr(obj: object, name: str) -> object:
    from mmengine.logging.history_buffer import HistoryBuffer

    if obj is HistoryBuffer and not name.startswith("_"):
        return getattr(obj, name)
    raise ValueError(f"getattr({obj!r}, {name!r}) is not allowed in a checkpoint")


def safe_globals() -> list[Any]:
    import numpy
    from mmengine.logging.history_buffer import HistoryBuffer
    from numpy._core.multiarray import _reconstruct, scalar

    return [
        numpy.ndarray,
        numpy.dtype,
        scalar,
        _reconstruct,
        HistoryBuffer,
        (_history_buffer_getattr, "builtins.getattr"),
        *{type(numpy.dtype(code)) for code in "?bBhHiIlLqQefdgFDG"},
    ]


def load_state_dict(path: str) -> Mapping[str, Any]:
    import torch

    with torch.serialization.safe_globals(safe_globals()):
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in loaded.values()
    ):
        raise ValueError("holds no state dict (a mapping of parameter names to tensors)")
    return loaded


def _num_classes(model_cfg: Mapping[str, Any]) -> int | None:
    for path in (("bbox_head",), ("roi_head", "bbox_head")):
        node: Any = model_cfg
        for key in path:
            node = node.get(key) if isinstance(node, Mapping) else None
        if isinstance(node, Mapping) and isinstance(node.get("num_classes"), int):
            return int(node["num_classes"])
    return None


def _strip_init_cfg(node: Any) -> None:
    """No pretrained weights are fetched while building the model to compare keys with."""
    if isinstance(node, dict):
        if "init_cfg" in node:
            node["init_cfg"] = None
        for value in node.values():
            _strip_init_cfg(value)
    elif isinstance(node, list):
        for value in node:
            _strip_init_cfg(value)


def _registered_types_only() -> None:
    """A `type` that no registry holds is not imported by its dotted name (mmengine's
    fallback for lazy-import configs): the model is built from registered classes only."""
    import mmengine.registry.registry as registry_module

    def refuse(name: str) -> None:
        raise ValueError(f"{name!r} is not a registered type")

    if hasattr(registry_module, "get_object_from_string"):
        registry_module.__dict__["get_object_from_string"] = refuse


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN_KEYS])
    more = len(keys) - _SHOWN_KEYS
    return f"{shown} and {more} more" if more > 0 else shown


def load_checked_config(config_path: str) -> Any:
    """The config as an mmengine `Config`, read as data (shared.model_config) and merged
    into the mmdet configs it inherits; ConfigRefused when it is not plain data."""
    from pathlib import Path

    from mmengine.config import Config

    from shared.model_config import mmdet_configs_root, read_config

    checked = read_config(Path(config_path).read_bytes(), configs_root=mmdet_configs_root())
    merged: dict[str, Any] = {}
    for base in checked.bases:
        merged.update(Config.fromfile(str(base)).to_dict())
    return Config(Config._merge_a_into_b(checked.data, merged))


def verify(config_path: str, checkpoint_path: str) -> dict[str, Any]:
    from shared.model_config import ConfigRefused

    try:
        cfg = load_checked_config(config_path)
        model_cfg = cfg.get("model")
        if not isinstance(model_cfg, Mapping) or "type" not in model_cfg:
            raise ValueError("defines no `model` with a `type`")
    except ConfigRefused as error:
        return {"ok": False, "errors": {"config": f"is refused: {error}"}}
    except Exception as error:
        return {"ok": False, "errors": {"config": f"not an MMDetection config: {error}"}}

    try:
        state = load_state_dict(checkpoint_path)
    except Exception as error:
        message = str(error).strip().splitlines()
        return {
            "ok": False,
            "errors": {"checkpoint": f"cannot be loaded: {message[-1] if message else error}"},
        }

    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    register_all_modules(init_default_scope=True)
    _registered_types_only()
    model_dict = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
    _strip_init_cfg(model_dict)
    try:
        model = MODELS.build(model_dict)
    except Exception as error:
        return {"ok": False, "errors": {"config": f"its model cannot be built: {error}"}}
    problems = weight_problems(model, state)
    if problems:
        return {
            "ok": False,
            "errors": {"checkpoint": "does not fit the config's model: " + problems},
        }
    return {
        "ok": True,
        "num_classes": _num_classes(model_dict),
        "parameter_count": int(sum(v.numel() for v in state.values())),
    }


def weight_problems(model: Any, state: Any) -> str:
    """What keeps a checkpoint's weights (`state`) from loading into `model`: missing and
    unexpected keys, tensors of other shapes; empty when they fit."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
    problems = []
    if missing:
        problems.append(f"{len(missing)} keys of the model are missing: {_listed(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} keys are not in the model: {_listed(unexpected)}")
    if mismatched:
        shapes = [f"{k} {found[k]} != {expected[k]}" for k in mismatched]
        problems.append(f"{len(mismatched)} tensors have other shapes: {_listed(shapes)}")
    return "; ".join(problems)


def without_network() -> bool:
    """Moves this process into a network namespace of its own (Linux, where user namespaces
    are allowed): nothing it loads can reach a database, NATS or anything else. True when
    it did; elsewhere the check still runs, with the rest of its confinement."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        return bool(libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNET) == 0)
    except OSError:
        return False


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m trainer_worker.verify CONFIG CHECKPOINT", file=sys.stderr)
        return 2
    without_network()
    print(json.dumps(verify(argv[0], argv[1])), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
