"""Style presets: a named system prompt, a guard sentence and the stop tokens, as YAML files.

The bundled presets live beside this module (``zhang_henshui.yaml``, ``shishuo.yaml``,
``none.yaml``) and load by name, also from an installed package; any other ``.yaml`` path loads too::

    name: shishuo
    description: 改写 modern Chinese into the classical style of Shishuo Xinyu (世说新语)
    system_prompt: 你是一个文学创作助手，擅长《世说新语》的文言笔法。
    guard: 你的回复必须在完成改写后立即结束，不得继续生成任何对话、提示或新任务。
    stop_tokens: ["<|im_end|>", "<|endoftext|>"]

A preset is applied to a chat only when the chat has no system message, unless ``override`` is
set (``preset_overrides_system: true`` in a run config): then it replaces the chat's own.

    >>> p = load_preset("shishuo")
    >>> p.system_message()
    '你是一个文学创作助手，擅长《世说新语》的文言笔法。你的回复必须在完成改写后立即结束，不得继续生成任何对话、提示或新任务。'
    >>> apply_preset([{"role": "user", "content": "hi"}], p)[0]["role"]
    'system'
    >>> apply_preset([{"role": "system", "content": "mine"}, {"role": "user", "content": "hi"}], p)[0]["content"]
    'mine'
    >>> apply_preset([{"role": "user", "content": "hi"}], load_preset("none"))
    [{'role': 'user', 'content': 'hi'}]
"""
from __future__ import annotations

import importlib.resources
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

_FIELDS = ("name", "description", "system_prompt", "guard", "stop_tokens")


class PresetError(ValueError):
    """A preset that cannot be found or is malformed."""


@dataclass(frozen=True, slots=True)
class Preset:
    """One style preset.

    Attributes:
        name: the preset's name (its file stem for the bundled ones).
        description: one line for humans.
        system_prompt: the system message a chat without one gets ("" = none).
        guard: a sentence appended to ``system_prompt`` that tells the model to stop after its
            answer ("" = none).
        stop_tokens: single tokens that end a reply; added to a run's ``decoding.stop_tokens``
            and to ``packlora decode``'s stop ids.
    """

    name: str
    description: str
    system_prompt: str
    guard: str
    stop_tokens: tuple[str, ...]

    def system_message(self) -> str:
        """``system_prompt`` followed directly by ``guard`` ("" when both are empty)."""
        return self.system_prompt + self.guard


def available_presets() -> list[str]:
    """Names of the bundled presets, sorted.

    >>> available_presets()
    ['none', 'shishuo', 'zhang_henshui']
    """
    return sorted(p.name[: -len(".yaml")] for p in importlib.resources.files(__name__).iterdir() if p.name.endswith(".yaml"))


def load_preset(name_or_path: str) -> Preset:
    """Load a bundled preset by name, or a preset YAML file by path.

    Raises:
        PresetError: no such preset or file, or the YAML lacks a field / has a wrong type
            (the message names the file and the field).
    """
    path = Path(name_or_path)
    if name_or_path.endswith((".yaml", ".yml")) or path.is_file():
        if not path.is_file():
            raise PresetError(f"preset file {name_or_path!r} does not exist")
        text, where = path.read_text(encoding="utf-8"), str(path)
    else:
        packaged = importlib.resources.files(__name__) / f"{name_or_path}.yaml"
        if not packaged.is_file():
            raise PresetError(
                f"preset {name_or_path!r} is neither a bundled preset {available_presets()} nor a YAML file"
            )
        text, where = packaged.read_text(encoding="utf-8"), f"presets/{name_or_path}.yaml"
    raw = yaml.safe_load(text)
    if not isinstance(raw, dict):
        raise PresetError(f"{where}: must be a mapping with keys {list(_FIELDS)}")
    problems = [f"unknown key {k!r}" for k in raw if k not in _FIELDS]
    for key in ("system_prompt", "guard"):
        if not isinstance(raw.get(key), str):
            problems.append(f"{key} must be a string (\"\" for none), got {raw.get(key)!r}")
    stops = raw.get("stop_tokens")
    if not isinstance(stops, list) or not stops or not all(isinstance(s, str) and s for s in stops):
        problems.append(f"stop_tokens must be a non-empty list of token strings, got {stops!r}")
    if problems:
        raise PresetError(f"{where}: " + "; ".join(problems))
    return Preset(
        name=str(raw.get("name") or path.stem),
        description=str(raw.get("description") or ""),
        system_prompt=raw["system_prompt"],
        guard=raw["guard"],
        stop_tokens=tuple(stops),
    )


def apply_preset(messages: Sequence[dict], preset: Preset | None, override: bool = False) -> list[dict]:
    """``messages`` with the preset's system message, as a new list (the input is not modified).

    A chat without a system message gets one; a chat with one keeps it unless ``override``.
    A preset with an empty system message (``none``) changes nothing.
    """
    messages = [dict(m) for m in messages]
    if preset is None or not preset.system_message():
        return messages
    has_system = bool(messages) and messages[0].get("role") == "system"
    if has_system and not override:
        return messages
    system = {"role": "system", "content": preset.system_message()}
    return [system, *messages[1:]] if has_system else [system, *messages]
