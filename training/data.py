"""The run's data, exactly as configured: one call shared by training and ``packlora inspect``."""
from __future__ import annotations

import logging

from data_utils.dataset import PreparedData, prepare_data

logger = logging.getLogger(__name__)


def load_run_preset(name):
    """The run's style preset (``preset:``), logged in full; None without one."""
    if name is None:
        return None
    from presets import load_preset

    preset = load_preset(str(name))
    logger.info("preset %s: system prompt %r, guard %r, stop tokens %s", preset.name, preset.system_prompt,
                preset.guard, list(preset.stop_tokens))
    return preset


def prepare_run_data(cfg, tokenizer, preset=None) -> PreparedData:
    """``data_utils.dataset.prepare_data`` with every ``data:`` setting (and the preset) of ``cfg``."""
    d = cfg.data
    return prepare_data(
        d.train, tokenizer, max_seq_length=d.max_seq_length, format=d.format, overflow=d.overflow,
        eval_holdout=d.eval_holdout, seed=cfg.seed, cache_dir=d.cache_dir, stage=d.stage, text_eos=d.text_eos,
        preset=preset, preset_overrides_system=cfg.preset_overrides_system, packing=d.packing, labels=d.labels,
        on_error=d.on_error,
    )
