"""Style presets: a named system prompt, a guard sentence and the stop tokens, as YAML files.

The bundled presets live beside this module (``zhang_henshui.yaml``, ``shishuo.yaml``,
``none.yaml``) and load by name, also from an installed package; any other ``.yaml`` path loads too::

    name: shishuo
    description: 改写 modern Chinese into the classical style of Shishuo Xinyu (世说新语)
    system_prompt: 你是一个文学创作助手，擅长《世说新语》的文言笔法。
    guard: 你的回复必须在完成改写后立即结束，不得继续生成任何对话、提示或新任务。
    known_system_prompts: []         # other system prompts that count as this preset's own
    stop_tokens: ["<|im_end|>", "<|endoftext|>"]

What ``apply_preset`` does to one chat (``PresetAction``):

=================================================== ============================== ================
the chat's system message                           becomes                        action
=================================================== ============================== ================
none                                                system_prompt + guard          ``added``
the preset's own (``system_prompt`` or one of       that prompt + guard            ``guard_appended``
``known_system_prompts``)
already ends with the guard                         unchanged                      ``already_guarded``
any other                                           unchanged                      ``kept_own``
any other, with ``override`` (``preset_overrides_   system_prompt + guard          ``replaced``
system: true``)
=================================================== ============================== ================

So the guard reaches every chat of the corpus a preset was written for, whose chats all carry the
preset's system prompt already, while a chat with a system message of its own keeps it untouched.

    >>> p = load_preset("shishuo")
    >>> p.system_message()
    '你是一个文学创作助手，擅长《世说新语》的文言笔法。你的回复必须在完成改写后立即结束，不得继续生成任何对话、提示或新任务。'
    >>> msgs, action = apply_preset([{"role": "user", "content": "hi"}], p)
    >>> msgs[0]["role"], action
    ('system', 'added')
    >>> msgs, action = apply_preset([{"role": "system", "content": p.system_prompt}, {"role": "user", "content": "hi"}], p)
    >>> msgs[0]["content"] == p.system_message(), action
    (True, 'guard_appended')
    >>> apply_preset([{"role": "system", "content": "mine"}, {"role": "user", "content": "hi"}], p)
    ([{'role': 'system', 'content': 'mine'}, {'role': 'user', 'content': 'hi'}], 'kept_own')
    >>> apply_preset([{"role": "user", "content": "hi"}], load_preset("none"))
    ([{'role': 'user', 'content': 'hi'}], 'unchanged')
"""
from __future__ import annotations

import importlib.resources
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import yaml

from packlora.core.errors import InputError

_FIELDS = ("name", "description", "system_prompt", "guard", "known_system_prompts", "stop_tokens")

PresetAction = Literal["added", "guard_appended", "already_guarded", "kept_own", "replaced", "unchanged"]
"""What ``apply_preset`` did to one chat (see the module docstring's table)."""
M = TypeVar("M")  # a message: a dict, or data_utils.types.Message
GUARDED_ACTIONS = ("added", "guard_appended", "already_guarded", "replaced")
"""Actions after which the chat's system message ends with the preset's guard."""


class PresetError(InputError):
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
        known_system_prompts: other system prompts that count as the preset's own: a chat
            carrying one of them gets the guard appended, like one carrying ``system_prompt``.
    """

    name: str
    description: str
    system_prompt: str
    guard: str
    stop_tokens: tuple[str, ...]
    known_system_prompts: tuple[str, ...] = ()

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
    known = raw.get("known_system_prompts", [])
    if not isinstance(known, list) or not all(isinstance(k, str) and k.strip() for k in known):
        problems.append(f"known_system_prompts must be a list of non-empty strings, got {known!r}")
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
        known_system_prompts=tuple(known),
    )


def apply_preset(
    messages: Sequence[dict], preset: Preset | None, override: bool = False
) -> tuple[list[dict], PresetAction]:
    """``messages`` (``{"role", "content"}`` dicts) with the preset's system message and guard, as a
    new list, and what was done (``preset_edit``; the input is not modified).

    Messages of another type (``data_utils.types.Message`` tuples) use ``preset_edit`` and
    ``splice_system`` directly and never become dicts.
    """
    messages = [dict(m) for m in messages]
    first = (messages[0].get("role"), messages[0]["content"]) if messages else None
    action, system = preset_edit(first, preset, override)
    return splice_system(messages, action, {"role": "system", "content": system}), action


def preset_edit(first: tuple[str, str] | None, preset: Preset | None,
                override: bool = False) -> tuple[PresetAction, str | None]:
    """What the preset does to a chat whose first turn is ``first`` (``(role, content)``; None for no
    turn): the action (see the module docstring's table) and the system message's new content
    (None when the chat stays as it is). A preset with an empty system message and guard
    (``none``), or no preset, changes nothing (``unchanged``). System prompts are compared after
    stripping surrounding whitespace.

    >>> p = load_preset("shishuo")
    >>> preset_edit(("system", "mine"), p)
    ('kept_own', None)
    >>> preset_edit(("system", "mine"), p, override=True) == ("replaced", p.system_message())
    True
    """
    if preset is None or not preset.system_message():
        return "unchanged", None
    if first is None or first[0] != "system":
        return "added", preset.system_message()
    own = first[1].strip()
    if preset.guard and own.endswith(preset.guard.strip()):
        return "already_guarded", None
    if override:
        return "replaced", preset.system_message()
    if own in {p.strip() for p in (preset.system_prompt, *preset.known_system_prompts) if p.strip()}:
        return "guard_appended", first[1] + preset.guard
    return "kept_own", None


def splice_system(messages: Sequence[M], action: PresetAction, system: M) -> list[M]:
    """``messages`` with ``system`` (the new system turn, of the messages' own type) put in as
    ``action`` says: before them (``added``), in place of the first (``guard_appended``,
    ``replaced``), or not at all."""
    if action == "added":
        return [system, *messages]
    if action in ("guard_appended", "replaced"):
        return [system, *messages[1:]]
    return list(messages)
