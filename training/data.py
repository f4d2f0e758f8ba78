"""The run's data, exactly as configured: one call shared by training and ``packlora inspect``."""
from __future__ import annotations

import logging

from packlora.core.errors import InputError
from packlora.data_utils.dataset import PreparedData, prepare_data

logger = logging.getLogger(__name__)


def load_run_preset(name):
    """The run's style preset (``preset:``), logged in full; None without one."""
    if name is None:
        return None
    from packlora.presets import load_preset

    preset = load_preset(str(name))
    logger.info("preset %s: system prompt %r, guard %r, stop tokens %s", preset.name, preset.system_prompt,
                preset.guard, list(preset.stop_tokens))
    return preset


def prepare_run_data(cfg, fmt, preset=None) -> PreparedData:
    """``data_utils.dataset.prepare_data`` with the ``data:`` settings, seed and preset of ``cfg``."""
    return prepare_data(cfg.data, fmt, seed=cfg.seed, preset=preset, preset_overrides_system=cfg.preset_overrides_system)


def run_stop_ids(cfg, fmt, preset=None) -> list[int]:
    """The run's stop ids: ``decoding.stop_tokens`` (default: the chat format's end of turn and end
    of text) and the preset's stop tokens (``ChatFormat.stop_ids``), logged.

    Raises:
        ValueError: a stop token that is not exactly one token; the message names where it came from.
    """
    tokens = list(fmt.default_stop_tokens if cfg.decoding.stop_tokens is None else cfg.decoding.stop_tokens)
    try:
        ids = fmt.stop_ids(tokens)
        if preset is not None:
            ids = list(dict.fromkeys(ids + fmt.stop_ids(preset.stop_tokens)))
    except ValueError as e:
        where = f"decoding.stop_tokens or preset {preset.name}" if preset else "decoding.stop_tokens"
        raise InputError(f"{where}: {e}") from None
    logger.info("chat format %s; stop ids %s", fmt.name, fmt.format_ids(ids))
    return ids
