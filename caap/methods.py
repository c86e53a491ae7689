"""Every attribution method of the toolkit by name, its settings as the command line passes them, and its
measured cost.

    from caap.methods import METHODS, get_method, parse_options
    method = get_method("rise", model, n_masks=1000)             # CAAP or any `caap.baselines` entry
    options = parse_options(["caap", "rise"], ["n_masks=1000", "caap.layers=4:7"])
    # {"caap": {"layers": (4, 7)}, "rise": {"n_masks": 1000}}

Options are the keyword arguments of a method's constructor (`inspect.signature`), parsed from text by
their annotations: whole numbers, numbers, true / false, a choice among a `Literal`'s values, `none` where
None is accepted, two whole numbers as `A:B` for a pair. A parameter whose annotation takes only Python
objects (a tensor, a context object) is set from Python, not from text. `key=value` goes to every chosen
method that takes `key`; `method.key=value` to that method only. An unknown key or a value of the wrong
type raises a ValueError that names what is accepted.

`measured_costs()` reads `caap/method_costs.csv`: the seconds per image each method's maps took in a
committed benchmark run (ViT-Tiny on 2 CPU cores; written by `experiments/method_costs.py`).
"""

from __future__ import annotations

import csv
import inspect
import json
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from caap.attribution.base import AttributionMethod
from caap.attribution.caap import CAAP
from caap.baselines import BASELINES

__all__ = [
    "COMMAND_LINE_FLAGS",
    "METHODS",
    "MeasuredCost",
    "canonical_name",
    "get_method",
    "measured_costs",
    "method_class",
    "method_options",
    "method_settings",
    "parse_method_list",
    "parse_options",
    "parse_value",
]

METHODS: dict[str, type[AttributionMethod]] = {"caap": CAAP, **BASELINES}
"""Every attribution method by name: CAAP first, then the baselines (`caap.baselines.BASELINES`)."""

COMMAND_LINE_FLAGS = {"batch_size": "--batch-size", "internal_batch_size": "--batch-size",
                      "precision": "--precision", "progress": None}
"""Constructor parameters the command line sets from its own flags (None: set by the command line
itself), so they are not `--option` keys."""

COSTS_FILE = Path(__file__).with_name("method_costs.csv")


def canonical_name(name: str) -> str:
    """A method name as the registry spells it: lower case, '-' as '_'."""
    return name.strip().lower().replace("-", "_")


def method_class(name: str) -> type[AttributionMethod]:
    """The class of the method called `name`; a ValueError naming the accepted names otherwise."""
    key = canonical_name(name)
    if key not in METHODS:
        raise ValueError(f"unknown method {name!r}; accepted: {', '.join(METHODS)}")
    return METHODS[key]


def get_method(name: str, model: Any, **settings: Any) -> AttributionMethod:
    """The method called `name` for `model`, built with `settings` (its constructor's keyword arguments)."""
    return method_class(name)(model, **settings)


def parse_method_list(text: str) -> list[str]:
    """`a,b,c` -> the registry's names, each once, in order; a ValueError for an unknown or empty list."""
    names = [canonical_name(t) for t in text.split(",") if t.strip()]
    if not names:
        raise ValueError(f"no method named in {text!r}; accepted: {', '.join(METHODS)}")
    for n in names:
        method_class(n)
    return list(dict.fromkeys(names))


# ------------------------------------------------------------------------------------------- options
@dataclass(frozen=True)
class Option:
    """One constructor parameter of a method: its name, annotation (resolved) and default."""

    name: str
    annotation: Any
    default: Any

    def describe(self) -> str:
        return f"{self.name} ({_describe(self.annotation)}, default {self.default!r})"


def method_options(name: str) -> dict[str, Option]:
    """The constructor parameters of method `name` that text can set: every keyword parameter after the
    model, less those the command line sets itself (`COMMAND_LINE_FLAGS`) and those that take only
    Python objects."""
    cls = method_class(name)
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # an annotation that cannot be resolved: fall back to the default's type
        hints = {}
    out = {}
    for p in list(inspect.signature(cls.__init__).parameters.values())[2:]:  # self, model
        if p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) or p.name in COMMAND_LINE_FLAGS:
            continue
        annotation = hints.get(p.name, type(p.default) if p.default not in (None, inspect.Parameter.empty) else Any)
        if _settable(annotation):
            out[p.name] = Option(p.name, annotation, None if p.default is inspect.Parameter.empty else p.default)
    return out


def _branches(annotation: Any) -> list[Any]:
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return [b for a in typing.get_args(annotation) for b in _branches(a)]
    return [annotation]


def _leaf_settable(a: Any) -> bool:
    if a in (int, float, bool, str, type(None)):
        return True
    origin = typing.get_origin(a)
    if origin is Literal:
        return True
    if origin in (tuple, list):
        args = [x for x in typing.get_args(a) if x is not Ellipsis]
        return bool(args) and all(x in (int, float) for x in args)
    return False


def _settable(annotation: Any) -> bool:
    return any(_leaf_settable(b) and b is not type(None) for b in _branches(annotation))


def _describe(annotation: Any) -> str:
    parts = []
    for b in _branches(annotation):
        if b is type(None):
            parts.append("none")
        elif b is bool:
            parts.append("true or false")
        elif b is int:
            parts.append("a whole number")
        elif b is float:
            parts.append("a number")
        elif b is str:
            parts.append("text")
        elif typing.get_origin(b) is Literal:
            parts.append("one of " + ", ".join(map(str, typing.get_args(b))))
        elif typing.get_origin(b) is tuple:
            args = typing.get_args(b)
            parts.append(f"{len(args)} whole numbers as " + ":".join("ABCD"[: len(args)]) if Ellipsis not in args
                         else "whole numbers as A,B,...")
        elif typing.get_origin(b) is list:
            parts.append("whole numbers as A,B,...")
    return " or ".join(dict.fromkeys(parts))


def _parse_leaf(text: str, a: Any) -> Any:
    t = text.strip()
    if a is type(None):
        if t.lower() == "none":
            return None
    elif a is bool:
        if t.lower() in ("true", "yes", "1", "on"):
            return True
        if t.lower() in ("false", "no", "0", "off"):
            return False
    elif a is int:
        if t.lstrip("+-").isdigit():
            return int(t)
    elif a is float:
        try:
            return float(t)
        except ValueError:
            pass
    elif a is str:
        return t
    elif typing.get_origin(a) is Literal:
        for choice in typing.get_args(a):
            if str(choice) == t:
                return choice
    elif typing.get_origin(a) in (tuple, list):
        args = typing.get_args(a)
        kinds = [x for x in args if x is not Ellipsis]
        parts = [p.strip() for p in t.replace(":", ",").split(",")]
        if typing.get_origin(a) is list or Ellipsis in args:
            kinds = kinds[:1] * len(parts)
        if len(parts) == len(kinds) and all(parts):
            try:
                values = [float(p) if k is float else int(p) for k, p in zip(kinds, parts)]
            except ValueError:
                return _NO
            return tuple(values) if typing.get_origin(a) is tuple else values
    return _NO


_NO = object()


def parse_value(text: str, annotation: Any) -> Any:
    """`text` as a value of `annotation` (see the module docstring); the branches of a union are tried
    from the most specific (none, true/false, numbers, choices, pairs) to plain text. A ValueError that
    says what is accepted otherwise."""
    branches = _branches(annotation)
    order = (type(None), bool, int, float)
    ranked = sorted(branches, key=lambda b: order.index(b) if b in order else (5 if b is str else 4))
    for b in ranked:
        value = _parse_leaf(text, b)
        if value is not _NO:
            return value
    raise ValueError(f"{text!r} is not {_describe(annotation)}")


def parse_options(methods: Sequence[str], specs: Sequence[str]) -> dict[str, dict[str, Any]]:
    """`key=value` / `method.key=value` texts -> {method: {key: value}} for the chosen `methods` (see the
    module docstring); every chosen method has an entry. A ValueError names what is accepted."""
    chosen = [canonical_name(m) for m in methods]
    out: dict[str, dict[str, Any]] = {m: {} for m in chosen}
    for spec in specs:
        key, sep, text = spec.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--option {spec!r} must look like KEY=VALUE or METHOD.KEY=VALUE, e.g. n_masks=1000")
        target, dot, param = key.rpartition(".")
        if param in COMMAND_LINE_FLAGS:
            flag = COMMAND_LINE_FLAGS[param]
            raise ValueError(f"--option {spec!r}: {param} is set by the command line"
                             + (f" (its flag {flag})" if flag else ""))
        if dot:
            target = canonical_name(target)
            if target not in chosen:
                raise ValueError(f"--option {spec!r} names method {target!r}, which is not among the chosen "
                                 f"methods ({', '.join(chosen)})")
            owners = [target]
        else:
            param = key
            owners = [m for m in chosen if param in method_options(m)]
        if dot and param not in method_options(target):
            raise ValueError(f"--option {spec!r}: {target} takes no option {param!r}; {_accepted(target)}")
        if not owners:
            raise ValueError(f"--option {spec!r}: no chosen method takes {param!r}; "
                             + "; ".join(_accepted(m) for m in chosen))
        for m in owners:
            opt = method_options(m)[param]
            if param in out[m]:
                raise ValueError(f"--option {param} is given twice for {m}")
            try:
                out[m][param] = parse_value(text, opt.annotation)
            except ValueError as e:
                raise ValueError(f"--option {spec!r}: {m}'s {param} must be {_describe(opt.annotation)}; "
                                 f"got {text.strip()!r}") from e
    return out


def _accepted(name: str) -> str:
    options = method_options(name)
    return f"{name} takes: " + (", ".join(o.describe() for o in options.values()) or "no options")


def method_settings(method: AttributionMethod, kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a built method runs with, JSON-ready: every constructor setting, the defaults overridden by
    `kwargs` (what it was built with); CAAP's layer range and context as resolved."""
    settings: dict[str, Any] = {}
    for p in list(inspect.signature(type(method).__init__).parameters.values())[2:]:
        if p.name != "progress" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            value = (kwargs or {}).get(p.name, p.default)
            settings[p.name] = None if value is inspect.Parameter.empty else value
    if isinstance(method, CAAP):
        settings["layers"], settings["context"] = list(method.layers), method.context.name
    return json.loads(json.dumps(settings, default=repr))


# -------------------------------------------------------------------------------------------- costs
@dataclass(frozen=True)
class MeasuredCost:
    """Seconds per image of a method's maps in a committed benchmark run, and the conditions."""

    seconds: float
    model: str
    images: int
    settings: dict[str, Any]
    machine: str
    source: str

    def describe(self) -> str:
        """e.g. "8.26 s (n_masks=500)"."""
        s = "<0.001 s" if self.seconds < 0.001 else f"{self.seconds:.3f} s" if self.seconds < 1 else f"{self.seconds:.2f} s"
        knobs = ", ".join(f"{k}={v}" for k, v in self.settings.items())
        return f"{s} ({knobs})" if knobs else s


def measured_costs(path: str | Path = COSTS_FILE) -> dict[str, MeasuredCost]:
    """{method: MeasuredCost} from `caap/method_costs.csv` (see `experiments/method_costs.py`); empty where
    the file is absent."""
    path = Path(path)
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        return {r["method"]: MeasuredCost(float(r["maps_s_per_image"]), r["model"], int(r["images"]),
                                          json.loads(r["settings"]), r["machine"], r["source"])
                for r in csv.DictReader(f)}
