"""Typed config sections, checked from their type hints: one rule for every package's config.

A section is a ``kw_only`` dataclass whose field annotations are the rules: ``Literal`` choices,
``bool`` (never a number), ``int`` (never a bool), ``float`` (an int is fine, a bool is not),
``str``, ``list[...]``, ``dict`` and ``X | None``. A field's ``metadata`` may add ``min`` / ``max``
bounds and a ``unit`` for the message. ``check_fields`` returns every problem, each starting with
the key at fault; ``build_section`` also names unknown keys, with a "did you mean". Nothing here
touches the file system or imports a heavy library.

    >>> from dataclasses import dataclass, field
    >>> from typing import Literal
    >>> @dataclass(kw_only=True)
    ... class Lora:
    ...     r: int = field(default=16, metadata={"min": 1})
    ...     mode: Literal["merge", "continue"] = "merge"
    >>> build_section(Lora, {"r": True, "mode": "fuse", "alhpa": 3}, "lora")[1]
    ["lora.alhpa: unknown key; valid keys are ['mode', 'r']", 'lora.r: must be an integer >= 1, got True', "lora.mode: 'fuse' is not one of ['merge', 'continue']"]

Overrides on the command line use one grammar everywhere (``parse_overrides``): ``key.sub=value``,
keys made of letters, digits, ``_`` and ``-``, values parsed with ``yaml.safe_load``.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from typing import Any, ClassVar, Literal, get_args, get_origin

from packlora.core.errors import InputError, MissingPathError

OVERRIDE_RE = re.compile(r"[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)*=.*", re.DOTALL)
"""``key.sub=value``: what ``parse_overrides`` accepts."""


class ConfigError(InputError):
    """One or more config problems; ``problems`` lists them, each starting with its key, and
    ``source`` says where they came from (a file, or the command line)."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = list(problems)
        self.source = source
        super().__init__(f"{len(self.problems)} problem(s) in {source}:\n" + "\n".join(f"  - {p}" for p in self.problems))


SYNONYMS = {
    # one word for another inside a key: a key spelt with the other word names the same setting
    "words": (("reasoning", "thinking"), ("think", "thinking"), ("len", "length"), ("sequence", "seq")),
    # whole keys that other trainers use for one of ours
    "keys": {"lr": "learning_rate", "epochs": "num_train_epochs", "batch_size": "per_device_train_batch_size",
             "grad_accum": "gradient_accumulation_steps", "cutoff_len": "max_seq_length",
             "max_length": "max_seq_length", "lora_rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
             "lora_target": "target_modules"},
}
"""Known synonyms, weighed before spelling by ``did_you_mean``: ``enable_reasoning`` is
``enable_thinking`` (the Qwen3 template's switch), not the nearer-spelt ``train_reasoning``."""


def did_you_mean(key: str, valid) -> str:
    """`` (did you mean 'x'?)`` for the valid key ``key`` most likely means, or ``""``.

    A key that becomes a valid one when a word is swapped for a known synonym (``SYNONYMS``) wins;
    otherwise the closest spelling (``difflib``, cutoff 0.7).

    >>> did_you_mean("max_seq_lenght", ["max_seq_length", "train"])
    " (did you mean 'max_seq_length'?)"
    >>> did_you_mean("enable_reasoning", ["enable_thinking", "train_reasoning"])
    " (did you mean 'enable_thinking'?)"
    """
    valid = list(valid)
    for candidate in _synonym_keys(key):
        if candidate in valid:
            return f" (did you mean {candidate!r}?)"
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.7)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _synonym_keys(key: str) -> list[str]:
    """``key`` with one known synonym swapped in (each word, either way round), and its whole-key synonym."""
    out = [SYNONYMS["keys"][key]] if key in SYNONYMS["keys"] else []
    words = key.split("_")
    for a, b in SYNONYMS["words"]:
        for src, dst in ((a, b), (b, a)):
            out += ["_".join(dst if w == src else w for w in words)] if src in words else []
    return out


def unknown_key(key: str, valid) -> str:
    """The message for an unknown key: the closest valid key, else the list of them."""
    hint = did_you_mean(key.rsplit(".", 1)[-1], valid)
    return f"{key}: unknown key{hint or f'; valid keys are {sorted(valid)}'}"


def parse_overrides(items) -> dict:
    """``["training.max_steps=5", "lora.target_modules=[q_proj]"]`` -> a nested dict.

    Values are parsed with ``yaml.safe_load`` (``5`` is an int, ``[a, b]`` a list, ``null`` None).

    >>> parse_overrides(["training.max_steps=5", "data.train=[a.jsonl]"])
    {'training': {'max_steps': 5}, 'data': {'train': ['a.jsonl']}}

    Raises:
        ConfigError: (source "the command line") an item is not ``key.sub=value``, its value is not
            YAML, or it sets a key inside a value another override set.
    """
    import yaml

    out: dict = {}
    bad = []
    for item in items:
        if not OVERRIDE_RE.fullmatch(item):
            bad.append(f"override {item!r} must have the form key.sub=value (e.g. training.max_steps=5)")
            continue
        key, _, value = item.partition("=")
        try:
            parsed = yaml.safe_load(value) if value else ""
        except yaml.YAMLError as e:
            bad.append(f"override {item!r}: the value is not valid YAML ({str(e).splitlines()[0]}); quote it")
            continue
        node, parts = out, key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                bad.append(f"override {item!r} conflicts with an earlier override of {part}")
                break
        else:
            node[parts[-1]] = parsed
    if bad:
        raise ConfigError(bad, "the command line")
    return out


def merge(base: dict, over: dict) -> dict:
    """``over`` merged into ``base`` recursively (a new dict; mappings merge, anything else replaces)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class Section:
    """Mixin for a config dataclass that validates itself on construction, without side effects.

    ``__post_init__`` checks every field against its annotation (``check_fields``) and then, if the
    types are right, the cross-field ``rules()``; it raises one ``ConfigError`` listing them all,
    each starting with ``section.key``. Subclasses set ``section`` and may override ``normalize``
    (to turn a shorthand into the canonical value, e.g. a single path into a list) and ``rules``.
    """

    section: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.normalize()
        problems = check_fields(self, self.section)
        if not problems:
            problems = self.rules()
        if problems:
            raise ConfigError(problems, self.section or "config")

    def normalize(self) -> None:
        """Rewrite shorthands in place (``object.__setattr__`` for frozen classes). Default: nothing."""

    def rules(self) -> list[str]:
        """Cross-field problems, each starting with the key at fault. Default: none."""
        return []

    def key(self, name: str) -> str:
        """``section.name``, for messages."""
        return f"{self.section}.{name}" if self.section else name


def load_yaml_config(path, overrides, build):
    """``build(merged_dict, source=path)`` for the YAML file ``path`` with ``overrides`` merged in.

    Problems with a key that an override set are marked "(set on the command line)", so a typo on
    the command line is not blamed on the file.

    Raises:
        MissingPathError: ``path`` does not exist.
        ConfigError: the YAML is not a mapping, an override is malformed, or ``build`` raised.
    """
    from pathlib import Path

    import yaml

    path = Path(path)
    if not path.is_file():
        raise MissingPathError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError([f"not valid YAML: {e}"], str(path)) from None
    if not isinstance(raw, dict):
        raise ConfigError([f"top level must be a mapping, got {type(raw).__name__}"], str(path))
    over = parse_overrides(list(overrides))
    try:
        return build(merge(raw, over), source=str(path))
    except ConfigError as e:
        raise ConfigError(mark_command_line(e.problems, overrides), config_source(path, overrides)) from None


def config_source(path, overrides) -> str:
    """Where a config's problems come from: ``path``, plus "with the command-line overrides" when any."""
    return str(path) + (" with the command-line overrides" if overrides else "")


def mark_command_line(problems, overrides) -> list[str]:
    """``problems`` (each starting with its key, ``key: ...``) with "(set on the command line)" added
    to each whose key an override set, so a typo on the command line is not blamed on the file.

    >>> mark_command_line(["training.max_step: unknown key", "lora.r: must be >= 1"], ["training.max_step=8"])
    ['training.max_step: unknown key (set on the command line)', 'lora.r: must be >= 1']
    """
    keys = [o.partition("=")[0] for o in overrides]

    def from_cli(problem: str) -> bool:
        head = problem.split(":", 1)[0]
        return any(head == k or head.startswith(k + ".") or k.startswith(head + ".") for k in keys)

    return [f"{p} (set on the command line)" if from_cli(p) and not p.endswith("(set on the command line)") else p
            for p in problems]


def build_config(cls, raw: dict, sections: dict, source: str, nullable=()):
    """``cls(**raw)`` with each key of ``sections`` built by ``build_section``; every problem of
    every section and top-level key collected into one ``ConfigError``. A key in ``nullable`` may
    be null (the section is off)."""
    names = [f.name for f in dataclasses.fields(cls)]
    problems = [unknown_key(k, names) for k in raw if k not in names]
    kwargs = {k: v for k, v in raw.items() if k in names and k not in sections}
    hints = typing.get_type_hints(cls)
    for name in list(kwargs):  # plain top-level values
        problem = check_value(kwargs[name], hints[name], name)
        if problem:
            problems.append(problem)
            del kwargs[name]
    for name, section in sections.items():
        if name in nullable and name in raw and raw[name] is None:
            kwargs[name] = None
            continue
        obj, sub = build_section(section, raw.get(name), name)
        problems += sub
        if obj is not None:
            kwargs[name] = obj
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in raw and f.name not in sections
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    problems += [f"{name}: required" for name in missing]
    if problems:
        raise ConfigError(problems, source)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(e.problems, source) from None


def build_section(cls, raw: Any, prefix: str):
    """``(instance or None, problems)``: ``cls(**raw)`` for the known keys, every unknown key and
    every field problem (``check_fields``, or the ``ConfigError`` a ``Section`` raises) named.
    ``raw`` None means all defaults."""
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        return None, [f"{prefix}: must be a mapping, got {type(raw).__name__}"]
    names = [f.name for f in dataclasses.fields(cls)]
    problems = [unknown_key(f"{prefix}.{k}", names) for k in raw if k not in names]
    missing = [f.name for f in dataclasses.fields(cls)
               if f.name not in raw and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    problems += [f"{prefix}.{name}: required" for name in missing]
    if missing:
        return None, problems
    try:
        obj = cls(**{k: v for k, v in raw.items() if k in names})
    except ConfigError as e:
        return None, problems + e.problems
    return obj, problems + ([] if isinstance(obj, Section) else check_fields(obj, prefix))


def check_fields(obj, prefix: str) -> list[str]:
    """Every field of dataclass ``obj`` that does not match its annotation and bounds."""
    hints = typing.get_type_hints(type(obj))
    problems = []
    for f in dataclasses.fields(obj):
        key = f"{prefix}.{f.name}" if prefix else f.name
        problem = check_value(getattr(obj, f.name), hints[f.name], key, f.metadata)
        if problem:
            problems.append(problem)
    return problems


def check_value(value, tp, key: str, meta=None) -> str | None:
    """The problem with ``value`` under type ``tp`` (and ``meta`` bounds), or None."""
    meta = meta or {}
    if _matches(value, tp):
        for bound, ok in (("min", lambda v, b: v >= b), ("max", lambda v, b: v <= b)):
            if bound in meta and isinstance(value, (int, float)) and not ok(value, meta[bound]):
                return f"{key}: must be {_describe(tp, meta)}, got {value!r}"
        return None
    choices = _literal_choices(tp)
    if choices and isinstance(value, str):
        return f"{key}: {value!r} is not one of {list(choices)}{did_you_mean(value, choices)}"
    return f"{key}: must be {_describe(tp, meta)}, got {value!r}"


def _matches(value, tp) -> bool:
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if tp is type(None):
        return value is None
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin is list or tp is list:
        return isinstance(value, list) and all(_matches(v, args[0]) for v in value) if args else isinstance(value, list)
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    if dataclasses.is_dataclass(tp):
        return isinstance(value, tp)
    return isinstance(value, tp)


def _literal_choices(tp) -> tuple:
    if get_origin(tp) is Literal:
        return get_args(tp)
    if get_origin(tp) in (typing.Union, types.UnionType):
        return tuple(c for a in get_args(tp) for c in _literal_choices(a))
    return ()


def _describe(tp, meta=None) -> str:
    meta = meta or {}
    origin, args = get_origin(tp), get_args(tp)
    if origin in (typing.Union, types.UnionType):
        parts = [_describe(a, meta) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    if origin is Literal:
        return f"one of {list(args)}"
    unit = f" ({meta['unit']})" if "unit" in meta else ""
    bounds = "".join(f" {op} {meta[b]}" for b, op in (("min", ">="), ("max", "<=")) if b in meta)
    if tp is bool:
        return "true or false"
    if tp is int:
        return f"an integer{bounds}{unit}"
    if tp is float:
        return f"a number{bounds}{unit}"
    if tp is str:
        return "a string"
    if origin is list or tp is list:
        return f"a list of {_describe(args[0])}s" if args else "a list"
    if origin is dict or tp is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))
