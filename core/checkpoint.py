"""The on-disk format of a packlora checkpoint: every file name, what each holds, how it is read
and written. Training writes it, decoding and export read it; both import it from here.

A checkpoint directory (``output_dir/checkpoint-N`` and the final ``output_dir``)::

    adapter_config.json          PEFT; base_model_name_or_path = the base directory when saved
    adapter_model.safetensors    every LoRA tensor at full shape (also under ZeRO-3)
    tokenizer.json, tokenizer_config.json, chat_template.jinja
    generation_config.json       eos_token_id = the stop ids, e.g. [151645, 151643]
    packlora_config.yaml         the resolved run config
    packlora_data_order.json     what maps rows to steps (world size, micro-batch, accumulation,
                                 max_seq_length, data cache key, seed); a resume checks it
    packlora_complete.json       written last, checkpoint-N only: {"global_step": N}
    trainer_state.json           transformers' Trainer state (checkpoint-N only; what a resume reads)

A full model (``lora: null``, or a merged export) has ``config.json`` + ``model.safetensors``
instead of the adapter files; an export adds ``packlora_export.json`` (where it came from). A base
packlora builds or merges lives in ``output_dir/base_model`` with a ``packlora_base.json`` that says
what it was made from.

``CheckpointInfo.read(dir)`` reads a checkpoint's small files once into one frozen record, from
which the chat format's settings, the stop ids, the length limit and the base path are derived::

    info = CheckpointInfo.read("runs/shishuo-tiny")
    fmt = ChatFormat(tokenizer, **info.format_options)
    stop_ids, max_new = info.stop_ids(fmt), info.max_new_tokens()
    base = info.base_model_path()               # also after the run was moved

Training writes (``write_extras``, ``verify_adapter``), decoding and export load (``load_model``,
``merge_adapter`` then ``save_merged``: a merge is checked on a probe batch against its adapter, and
the saved model's tensors against the one in memory, before it is kept).
"""
from __future__ import annotations

import hashlib
import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from packlora.core.config import Section
from packlora.core.errors import InputError, MissingPathError, StateError
from packlora.core.quiet import peft_wrapping

logger = logging.getLogger(__name__)

# Every file name of the format, spelled here only.
RUN_CONFIG = "packlora_config.yaml"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MODEL_CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
COMPLETE_MARKER = "packlora_complete.json"
DATA_ORDER = "packlora_data_order.json"
TRAINER_STATE = "trainer_state.json"
BASE_MARKER = "packlora_base.json"
EXPORT_MARKER = "packlora_export.json"
BASE_MODEL_DIR = "base_model"
DEFAULT_MAX_NEW_TOKENS = 512


@dataclass(frozen=True, kw_only=True)
class DecodingConfig(Section):
    """A run's ``decoding:`` section: how its checkpoints stop (``generation_config.json``)::

        decoding: {stop_tokens: null, max_new_tokens: 512}   # null: the chat format's end of turn and text
    """

    section = "decoding"

    stop_tokens: list[str] | None = None
    """Tokens that end generation, each exactly one token of the tokenizer; their ids become
    ``generation_config.eos_token_id``. null: the chat format's own end-of-turn and end-of-text
    tokens (``ChatFormat.default_stop_tokens``). Multi-token stop strings belong to the decoder."""
    max_new_tokens: int = field(default=512, metadata={"min": 1, "unit": "tokens"})
    """Generation length limit."""


class IncompleteAdapterError(StateError):
    """A saved adapter is missing tensors or has wrong/zero-size shapes."""


def is_adapter(ckpt: str | Path) -> bool:
    """True for a LoRA checkpoint (``adapter_config.json``), False for a full model."""
    return (Path(ckpt) / ADAPTER_CONFIG).is_file()


def is_model(ckpt: str | Path) -> bool:
    """True for a full model directory (``config.json``)."""
    return (Path(ckpt) / MODEL_CONFIG).is_file()


@dataclass(frozen=True, kw_only=True)
class CheckpointInfo:
    """What a checkpoint directory says about itself, read once (``CheckpointInfo.read``).

    Attributes:
        path: the checkpoint directory, resolved.
        is_adapter: a LoRA checkpoint (``adapter_config.json``); else a full model (``config.json``).
        run_config: ``packlora_config.yaml`` (the resolved run config), ``{}`` when absent.
        generation_config: ``generation_config.json``, ``{}`` when absent.
        adapter_config: ``adapter_config.json``, ``{}`` for a full model.
        global_step: from ``packlora_complete.json``; None when the marker is absent (a final
            ``output_dir``, or a save that was cut short).
    """

    path: Path
    is_adapter: bool
    run_config: dict = field(default_factory=dict)
    generation_config: dict = field(default_factory=dict)
    adapter_config: dict = field(default_factory=dict)
    global_step: int | None = None

    @classmethod
    def read(cls, path: str | Path) -> "CheckpointInfo":
        """Read the small files of the checkpoint at ``path``.

        Raises:
            MissingPathError: ``path`` holds neither ``adapter_config.json`` nor ``config.json``.
            InputError: ``packlora_config.yaml`` is not a mapping (or its ``decoding`` is not), or a
                JSON file is not valid JSON.
        """
        path = Path(path).resolve()
        adapter = is_adapter(path)
        if not adapter and not is_model(path):
            raise MissingPathError(
                f"{path} is not a checkpoint: it has neither {ADAPTER_CONFIG} (LoRA adapter) nor {MODEL_CONFIG} "
                "(full model); pass the directory that training saved")
        config = {}
        if (path / RUN_CONFIG).is_file():
            config = yaml.safe_load((path / RUN_CONFIG).read_text(encoding="utf-8")) or {}
            if not isinstance(config, dict) or not isinstance(config.get("decoding") or {}, dict):
                raise InputError(f"{path / RUN_CONFIG}: must be a mapping whose 'decoding' is a mapping")
        complete = _read_json(path / COMPLETE_MARKER)
        return cls(path=path, is_adapter=adapter, run_config=config,
                   generation_config=_read_json(path / GENERATION_CONFIG),
                   adapter_config=_read_json(path / ADAPTER_CONFIG) if adapter else {},
                   global_step=complete.get("global_step") if complete else None)

    @property
    def format_options(self) -> dict:
        """Keyword arguments of ``ChatFormat(tokenizer, **info.format_options)``: the run's
        ``data.chat_format`` (``auto`` when unsaid), ``enable_thinking`` and ``train_reasoning``."""
        data = self.run_config.get("data") or {}
        return {"name": data.get("chat_format") or "auto", "enable_thinking": data.get("enable_thinking"),
                "train_reasoning": data.get("train_reasoning", True)}

    @property
    def stop_tokens(self) -> list[str] | None:
        """The run's ``decoding.stop_tokens`` (None: the chat format's defaults)."""
        return (self.run_config.get("decoding") or {}).get("stop_tokens")

    @property
    def adapter_on_random_base(self) -> bool:
        """An adapter whose base the run built at random from ``model.config`` (no ``init_from``): a
        model that never learned language, let alone to end a turn (the demo's)."""
        model = self.run_config.get("model") or {}
        return self.is_adapter and bool(model.get("config")) and not self.run_config.get("init_from")

    def stop_ids(self, fmt) -> list[int]:
        """The stop ids: ``generation_config.json``'s ``eos_token_id``, the format's end of turn, the
        tokenizer's eos and ``decoding.stop_tokens`` (``ChatFormat.stop_ids``).

        Raises:
            StopTokenError, InputError: a stop token or eos id in the checkpoint's configs is invalid.
        """
        if not self.generation_config:
            logger.warning("%s has no %s; stop ids come from the tokenizer and chat format only", self.path,
                           GENERATION_CONFIG)
        return fmt.stop_ids(self.stop_tokens, generation_config=self.generation_config)

    def max_new_tokens(self, default: int = DEFAULT_MAX_NEW_TOKENS) -> int:
        """``decoding.max_new_tokens`` of the run config, else ``generation_config.json``'s, else ``default``.

        Raises:
            InputError: the stored value is not a positive int.
        """
        value = (self.run_config.get("decoding") or {}).get("max_new_tokens") or self.generation_config.get("max_new_tokens")
        value = default if value is None else value
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"max_new_tokens in {self.path} is {value!r}; set decoding.max_new_tokens in {RUN_CONFIG} "
                             "to a positive int")
        return value

    def base_model_path(self) -> Path | None:
        """The base model directory of an adapter checkpoint, also after the run was moved; None for a
        full model.

        Tried in order: ``<ckpt>/base_model``, ``<ckpt>/../base_model`` (where packlora saves a base it
        built or merged, beside its checkpoints), then ``base_model_name_or_path`` of
        ``adapter_config.json`` (the path recorded at save time; relative paths from the working
        directory). The first that holds a ``config.json`` wins; a fallback past the recorded path is
        logged.

        Raises:
            MissingPathError: none of them is a model directory; the message lists the paths tried.
        """
        if not self.is_adapter:
            return None
        ckpt = self.path
        recorded = self.adapter_config.get("base_model_name_or_path")
        tried = [ckpt / BASE_MODEL_DIR, ckpt.parent / BASE_MODEL_DIR] + ([Path(recorded)] if recorded else [])
        for candidate in tried:
            if is_model(candidate):
                if recorded and candidate.resolve() != Path(recorded).resolve():
                    logger.info("base model of %s: %s (recorded as %s)", ckpt, candidate, recorded)
                return candidate
        raise MissingPathError(
            f"base model for adapter checkpoint {ckpt} not found; tried " + ", ".join(str(p) for p in tried)
            + f". Put the base model (config.json + weights) at {ckpt.parent / BASE_MODEL_DIR}, or point "
            f"base_model_name_or_path in {ckpt / ADAPTER_CONFIG} at it"
        )


def _read_json(path: Path) -> dict:
    """A JSON file of the format as a dict, ``{}`` when absent.

    Raises:
        InputError: the file is not valid JSON.
    """
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e}); the checkpoint is damaged, use another one") from None


def write_extras(ckpt: str | Path, tokenizer, config: dict, stop_ids: list[int], pad_id: int,
                 max_new_tokens: int | None) -> None:
    """Write the tokenizer, ``generation_config.json`` (``eos_token_id`` = ``stop_ids``) and
    ``packlora_config.yaml`` (the resolved run config) into ``ckpt``."""
    ckpt = Path(ckpt)
    tokenizer.save_pretrained(ckpt)
    generation_config(stop_ids, pad_id, max_new_tokens).save_pretrained(ckpt)
    (ckpt / RUN_CONFIG).write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False), encoding="utf-8")


def generation_config(stop_ids: list[int], pad_id: int, max_new_tokens: int | None = None):
    """A ``GenerationConfig`` that stops at ``stop_ids`` and pads with ``pad_id``."""
    from transformers import GenerationConfig

    extra = {"max_new_tokens": max_new_tokens} if max_new_tokens else {}
    return GenerationConfig(eos_token_id=list(stop_ids), pad_token_id=pad_id, **extra)


def set_stop_ids(model, stop_ids: list[int], pad_id: int) -> None:
    """Make ``model.generation_config`` (saved with the model) stop at ``stop_ids``: so that plain
    ``model.generate()`` stops where packlora's decoder does, also after a plain PEFT load."""
    model.generation_config.eos_token_id = list(stop_ids)
    model.generation_config.pad_token_id = pad_id


def verify_adapter(ckpt: str | Path, expected: dict[str, tuple[int, ...]]) -> int:
    """Check ``adapter_model.safetensors`` holds exactly the expected LoRA tensors at full shape.

    Args:
        ckpt: checkpoint directory.
        expected: saved tensor name -> full shape.

    Returns:
        Number of tensors checked.

    Raises:
        IncompleteAdapterError: a tensor is missing, unexpected, zero-size or of the wrong shape.
    """
    from safetensors import safe_open

    path = Path(ckpt) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise IncompleteAdapterError(f"{path} was not written")
    with safe_open(str(path), framework="pt") as f:
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    problems = [f"missing {k} {s}" for k, s in expected.items() if k not in saved]
    problems += [f"unexpected {k}" for k in saved if k not in expected]
    problems += [f"{k} has shape {saved[k]}, expected {s}" for k, s in expected.items() if k in saved and saved[k] != s]
    problems += [f"{k} is empty {s}" for k, s in saved.items() if 0 in s or not s]
    if problems:
        raise IncompleteAdapterError(f"{path}: " + "; ".join(problems[:10]))
    return len(saved)


def adapter_sha256(ckpt: str | Path) -> str:
    """sha256 of the adapter weights file (hex)."""
    with open(Path(ckpt) / ADAPTER_WEIGHTS, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def resolve_base_model(ckpt: str | Path) -> Path:
    """``CheckpointInfo.read(ckpt).base_model_path()`` for an adapter checkpoint.

    Raises:
        MissingPathError: no base model found (the message lists the paths tried).
    """
    return CheckpointInfo.read(ckpt).base_model_path()


def stored_dtype(model_dir: str | Path):
    """The torch dtype a model directory's weights are stored in (its config's ``dtype``), float32 if unsaid."""
    import torch
    from transformers import AutoConfig

    stored = getattr(AutoConfig.from_pretrained(model_dir), "dtype", None)
    return stored if isinstance(stored, torch.dtype) else getattr(torch, str(stored or "float32"), torch.float32)


MERGE_TOLERANCE = 1e-4
"""How far (fp32 logits) a merged model may be from its adapter on the probe batch: ``|merged -
adapter| <= MERGE_TOLERANCE * (1 + |adapter|)``. A correct merge of a tiny Qwen2 is 1e-6 off; a
LoRA on a tied ``lm_head`` merged into the shared tensor was 4.4 off (issue 23)."""


class MergeMismatchError(StateError):
    """A merged model's logits on the probe batch differ from its adapter's (or a saved merged model's
    from the one in memory) beyond ``MERGE_TOLERANCE``; the merged model is not kept."""


def merge_adapter(ckpt: str | Path, base: str | Path | None = None):
    """Load the base in float32, apply the adapter of ``ckpt``, merge it (W + alpha/r * B @ A) and
    prove it: the merged model's logits on a probe batch (``probe_ids``) equal the adapter's within
    ``MERGE_TOLERANCE``.

    Tied embeddings (``tie_word_embeddings``: Qwen2-0.5B/1.5B, Gemma): with a LoRA on ``lm_head``
    (or ``embed_tokens``) the input and output embeddings are one tensor, and a plain merge writes
    the delta into both, so the input embedding changes too. They are untied first
    (``untie_adapted_embeddings``): the adapted side gets its own copy, and the merged model's
    config says ``tie_word_embeddings: false``, so both tensors are saved.

    Returns:
        ``(model, dtype)``: the merged ``AutoModelForCausalLM`` (float32, on CPU, eval mode) and the
        dtype the base was stored in (to cast back to before saving, with ``save_merged``).

    Raises:
        MissingPathError: the base cannot be found (``CheckpointInfo.base_model_path``).
        MergeMismatchError: the merged model's probe logits differ from the adapter's.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = Path(base) if base is not None else resolve_base_model(ckpt)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, use_safetensors=True)
    with warnings.catch_warnings(), peft_wrapping():  # PEFT's advice to untie by hand: done just below
        warnings.filterwarnings("ignore", message="Model with `tie_word_embeddings=True`")
        model = PeftModel.from_pretrained(model, str(ckpt), is_trainable=False).eval()
    if untie_adapted_embeddings(model.get_base_model()):
        logger.info("%s adapts a tied embedding: untying input and output embeddings before the merge", ckpt)
    ids = probe_ids(model.get_base_model())
    want = _probe_logits(model, ids)
    merged = model.merge_and_unload().eval()
    _sync_tie_config(merged)
    _check_probe(want, _probe_logits(merged, ids), f"the merge of {ckpt} into {base}",
                 "its adapter (base + LoRA, unmerged)")
    return merged, stored_dtype(base)


def save_merged(model, dtype, out_dir: str | Path) -> None:
    """Cast ``model`` to ``dtype`` in place, save it to ``out_dir``, load it back and check that every
    saved tensor equals the in-memory model's, bit for bit: what is on disk is what ``merge_adapter``
    verified (a tied key dropped on save, and the model loading back with a fresh head, shows here).

    Tensors, not probe logits: ``model.to(bfloat16)`` also casts the rotary ``inv_freq`` buffer,
    which is not saved and is rebuilt in float32 on load, so a correct bf16 save's logits differ from
    the in-memory model's by up to 0.09 on a tiny Qwen2.

    Raises:
        MergeMismatchError: a tensor is missing, extra or different after the reload; the caller
            removes ``out_dir``.
    """
    import torch
    from transformers import AutoModelForCausalLM

    model.to(dtype)
    want = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    model.save_pretrained(out_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=dtype, use_safetensors=True)
    try:
        got = reloaded.state_dict()
        differ = sorted(k for k in want.keys() | got.keys()
                        if k not in want or k not in got or not torch.equal(want[k], got[k].cpu()))
    finally:
        del reloaded
    if differ:
        raise MergeMismatchError(
            f"the merged model saved to {out_dir} is wrong: {len(differ)} tensor(s) load back different from "
            f"the merged model in memory ({', '.join(differ[:3])}{', ...' if len(differ) > 3 else ''}). Refusing "
            "to write it: this is a bug in the save, please report it with the adapter's adapter_config.json and "
            "the base's config.json")
    logger.info("the merged model saved to %s loads back with all %d tensors equal", out_dir, len(want))


def untie_adapted_embeddings(model) -> bool:
    """Give the output embedding its own copy of a weight it shares with the input embedding, when an
    adapter layer (PEFT ``BaseTunerLayer``) wraps either of them; True when it did.

    ``model`` is the transformers model (``PeftModel.get_base_model()``). Its logits do not change:
    both embeddings keep their values, they only stop being one tensor.
    """
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if inp is None or out is None or not (isinstance(inp, BaseTunerLayer) or isinstance(out, BaseTunerLayer)):
        return False
    out_base = out.get_base_layer() if isinstance(out, BaseTunerLayer) else out
    in_base = inp.get_base_layer() if isinstance(inp, BaseTunerLayer) else inp
    if out_base.weight.data_ptr() != in_base.weight.data_ptr():
        return False
    out_base.weight = torch.nn.Parameter(out_base.weight.detach().clone(), requires_grad=False)
    _sync_tie_config(model)
    return True


def _sync_tie_config(model) -> None:
    """Make ``tie_word_embeddings`` (also of a nested text config) say whether the input and output
    embeddings are one tensor, so that ``save_pretrained`` writes both when they are not."""
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if inp is None or out is None:
        return
    tied = inp.weight.data_ptr() == out.weight.data_ptr()
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        if getattr(config, "tie_word_embeddings", None) and not tied:
            config.tie_word_embeddings = False


def probe_ids(model, rows: int = 2, length: int = 16):
    """The probe batch: ``[rows, length]`` int64 token ids drawn (seed 0) from the whole vocabulary
    of ``model``'s input embedding, so every merge is checked on the same ids."""
    import torch

    vocab = model.get_input_embeddings().weight.shape[0]
    return torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(0))


def _probe_logits(model, ids):
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        return model(input_ids=ids.to(device), use_cache=False).logits.float().cpu()


def _check_probe(want, got, what: str, reference: str) -> None:
    diff = (got - want).abs()
    bound = MERGE_TOLERANCE * (1 + want.abs())
    if not bool((diff <= bound).all()):
        agree = float((got.argmax(-1) == want.argmax(-1)).float().mean())
        raise MergeMismatchError(
            f"{what} is wrong: its logits on the probe batch differ from {reference} by up to "
            f"{float(diff.max()):.4g} (tolerance {MERGE_TOLERANCE:g} x (1 + |logit|)); the top token agrees at "
            f"{agree:.0%} of positions. Refusing to write it: this is a bug in the merge, please report it "
            "with the adapter's adapter_config.json and the base's config.json")
    logger.info("%s: probe logits within %.2g of %s", what, float(diff.max()), reference)


def load_model(info: CheckpointInfo, dtype: Any, device: Any):
    """``(model, inner, base_path)``: the checkpoint's model in eval mode on ``device`` (a
    ``PeftModel`` on its base for an adapter checkpoint), the underlying transformers model (whose
    ``generation_config`` ``generate`` reads), and the base directory (None for a full model).

    Raises:
        MissingPathError: an adapter's base is missing.
    """
    from transformers import AutoModelForCausalLM

    base_path = info.base_model_path()
    if info.is_adapter:
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype, use_safetensors=True)
        with peft_wrapping():
            model = PeftModel.from_pretrained(base, info.path, is_trainable=False)
        inner = model.get_base_model()
    else:
        model = inner = AutoModelForCausalLM.from_pretrained(info.path, dtype=dtype, use_safetensors=True)
    model.to(device).eval()
    return model, inner, base_path
