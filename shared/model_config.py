"""An imported model's config, read without running it.

MMEngine configs are Python files, and loading one with `Config.fromfile` executes it.
An uploaded config is therefore read here as data: its syntax tree is checked to be a
module of assignments whose values are literals (strings, numbers, True/False/None),
lists, tuples, dicts, `dict(key=value, ...)` calls and names assigned earlier in the
file, and then evaluated by walking that tree (as `ast.literal_eval` does). Anything
else (an import, any other call, an attribute, an operator, a comprehension, a lambda)
is refused with the line it is on. `_base_` may name only configs shipped inside the
installed mmdet package (`<mmdet>/.mim/configs`): `"mmdet::retinanet/x.py"`, a path
relative to that folder, or an absolute path inside it.

What is allowed is documented in docs/imports.md. This module imports nothing heavy:
the services check a config before any child process sees it.
"""

from __future__ import annotations

import ast
import copy
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_CONFIG_BYTES = 1024 * 1024
# Deeper nesting than any MMDetection config has; the tree walk stays far from the
# interpreter's recursion limit.
_MAX_DEPTH = 40
# A registry type: a class name, optionally scoped to one of the packages that register
# MMDetection's models. Dotted paths would make mmengine import arbitrary modules.
_TYPE = re.compile(r"(?:(?:mmdet|mmengine|mmcv)\.)?[A-Za-z_][A-Za-z0-9_]*")
# mmengine reads these and imports or executes what they name.
_REFUSED_NAMES = frozenset({"custom_imports"})
_SHOWN_CHARS = 40


class ConfigRefused(ValueError):
    """What makes a config unreadable as data; says where, never echoes much of it."""


@dataclass(frozen=True, slots=True)
class CheckedConfig:
    # The file's own assignments, `_base_` left out, as plain Python data.
    data: dict[str, Any]
    # The mmdet configs it inherits, in order.
    bases: tuple[Path, ...]


def mmdet_configs_root() -> Path | None:
    """The `configs` folder packaged in the installed mmdet, found without importing mmdet
    (which would import torch); None where mmdet is not installed."""
    spec = importlib.util.find_spec("mmdet")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations))) / ".mim" / "configs"
    return root if root.is_dir() else None


def read_config(source: bytes | str, *, configs_root: Path | None) -> CheckedConfig:
    """The config's data, or ConfigRefused naming the first problem."""
    if isinstance(source, bytes):
        if len(source) > MAX_CONFIG_BYTES:
            raise ConfigRefused(f"larger than {MAX_CONFIG_BYTES} bytes")
        try:
            source = source.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigRefused("not UTF-8 text") from None
    if "\x00" in source:
        raise ConfigRefused("contains a NUL byte")
    try:
        tree = ast.parse(source, mode="exec")
    except SyntaxError as error:
        raise ConfigRefused(f"not valid Python syntax (line {error.lineno})") from None
    except (ValueError, RecursionError, MemoryError):
        raise ConfigRefused("cannot be parsed") from None
    reader = _Reader()
    for index, statement in enumerate(tree.body):
        reader.statement(statement, docstring=index == 0)
    data = reader.names
    bases = _bases(data.pop("_base_", None), configs_root)
    return CheckedConfig(data=data, bases=bases)


class _Reader:
    def __init__(self) -> None:
        self.names: dict[str, Any] = {}

    def statement(self, node: ast.stmt, *, docstring: bool) -> None:
        if docstring and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            if isinstance(node.value.value, str):
                return
        if not isinstance(node, ast.Assign):
            raise _refused(node, f"has {_describe_statement(node)}")
        if len(node.targets) != 1 or not isinstance(node.targets[0], ast.Name):
            raise _refused(node, "assigns to something other than one plain name")
        name = node.targets[0].id
        if name in _REFUSED_NAMES:
            raise _refused(node, f"sets {name}, which would import code")
        self.names[name] = self.value(node.value, depth=0)

    def value(self, node: ast.expr, *, depth: int) -> Any:
        if depth > _MAX_DEPTH:
            raise _refused(node, f"nests values deeper than {_MAX_DEPTH} levels")
        inner = depth + 1
        if isinstance(node, ast.Constant):
            if node.value is None or isinstance(node.value, bool | int | float | str):
                return node.value
            raise _refused(node, f"has a {type(node.value).__name__} literal")
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            operand = self.value(node.operand, depth=inner)
            if isinstance(operand, int | float) and not isinstance(operand, bool):
                return -operand if isinstance(node.op, ast.USub) else operand
            raise _refused(node, "applies a sign to something other than a number")
        if isinstance(node, ast.List):
            return [self.value(item, depth=inner) for item in node.elts]
        if isinstance(node, ast.Tuple):
            return tuple(self.value(item, depth=inner) for item in node.elts)
        if isinstance(node, ast.Dict):
            result: dict[Any, Any] = {}
            for key, item in zip(node.keys, node.values, strict=True):
                if key is None:
                    raise _refused(node, "unpacks a dict with **")
                result[self._key(key, inner)] = self.value(item, depth=inner)
            return self._typed(node, result)
        if isinstance(node, ast.Call):
            return self._call(node, inner)
        if isinstance(node, ast.Name):
            if node.id in self.names:
                # A name assigned earlier: its value, as a literal copy would be.
                return copy.deepcopy(self.names[node.id])
            raise _refused(node, f"uses the name {_short(node.id)}, which is not assigned above")
        raise _refused(node, f"has {_describe_expression(node)}")

    def _key(self, node: ast.expr, depth: int) -> Any:
        key = self.value(node, depth=depth)
        if isinstance(key, str | int) and not isinstance(key, bool):
            return key
        raise _refused(node, "has a dict key that is not a string or an integer")

    def _call(self, node: ast.Call, depth: int) -> Any:
        if not (isinstance(node.func, ast.Name) and node.func.id == "dict"):
            raise _refused(node, f"calls {_callee(node.func)}()")
        if node.args:
            raise _refused(node, "calls dict() with positional arguments")
        result: dict[str, Any] = {}
        for keyword in node.keywords:
            if keyword.arg is None:
                raise _refused(node, "calls dict() with ** arguments")
            result[keyword.arg] = self.value(keyword.value, depth=depth)
        return self._typed(node, result)

    @staticmethod
    def _typed(node: ast.expr, value: dict[Any, Any]) -> dict[Any, Any]:
        kind = value.get("type")
        if kind is not None and not (isinstance(kind, str) and _TYPE.fullmatch(kind)):
            raise _refused(
                node,
                f"has type={_short(repr(kind))}: a type is a registered class name "
                "(optionally mmdet., mmengine. or mmcv. scoped)",
            )
        return value


def _bases(value: Any, root: Path | None) -> tuple[Path, ...]:
    if value is None:
        return ()
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
        raise ConfigRefused("_base_ must be a config name or a list of them")
    if root is None:
        raise ConfigRefused("_base_ cannot be resolved: mmdet's configs are not installed here")
    resolved_root = root.resolve()
    bases = []
    for name in names:
        relative = name.removeprefix("mmdet::")
        candidate = Path(relative) if Path(relative).is_absolute() else resolved_root / relative
        path = candidate.resolve()
        if not path.is_relative_to(resolved_root) or path.suffix != ".py" or not path.is_file():
            raise ConfigRefused(
                f"_base_ {_short(name)} is not a config shipped with mmdet "
                "(name one as 'mmdet::<folder>/<file>.py')"
            )
        bases.append(path)
    return tuple(bases)


def _refused(node: ast.AST, what: str) -> ConfigRefused:
    line = getattr(node, "lineno", "?")
    return ConfigRefused(f"only literal assignments are allowed; line {line} {what}")


def _callee(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return _short(node.id)
    if isinstance(node, ast.Attribute):
        return f"{_callee(node.value)}.{_short(node.attr)}"
    if isinstance(node, ast.Call):
        return f"{_callee(node.func)}()"
    return "an expression"


def _short(text: str) -> str:
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 1] + "\u2026"


_STATEMENTS: dict[type[ast.stmt], str] = {
    ast.Import: "an import",
    ast.ImportFrom: "an import",
    ast.FunctionDef: "a function definition",
    ast.AsyncFunctionDef: "a function definition",
    ast.ClassDef: "a class definition",
    ast.Expr: "an expression statement",
    ast.AugAssign: "an augmented assignment",
    ast.AnnAssign: "an annotated assignment",
}


def _describe_statement(node: ast.stmt) -> str:
    if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
        return f"a statement that calls {_callee(node.value.func)}()"
    return _STATEMENTS.get(type(node), f"a {type(node).__name__.lower()} statement")


def _describe_expression(node: ast.expr) -> str:
    if isinstance(node, ast.Attribute):
        return f"an attribute access ({_callee(node)})"
    if isinstance(node, ast.BinOp | ast.BoolOp | ast.Compare | ast.UnaryOp):
        return "an operator"
    if isinstance(node, ast.Lambda):
        return "a lambda"
    if isinstance(node, ast.ListComp | ast.SetComp | ast.DictComp | ast.GeneratorExp):
        return "a comprehension"
    if isinstance(node, ast.JoinedStr):
        return "an f-string"
    if isinstance(node, ast.Subscript):
        return "a subscript"
    return f"a {type(node).__name__.lower()} expression"
