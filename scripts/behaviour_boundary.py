"""The behaviour-boundary experiment: does a fine-tuned chat model end its turn?

    python scripts/behaviour_boundary.py                 # the doc: base from cache, then all rows
    python scripts/behaviour_boundary.py --quick         # a few minutes: tiny everything, doc under --work-dir
    python scripts/behaviour_boundary.py --base large    # GPU: a larger base (its own cache entry)
    python scripts/behaviour_boundary.py --rebuild-base  # pre-train the base again even if cached

A documented experiment, not a test (CI never runs it). Everything is on the real bundled data
(``../shared``), and every model is a real packlora run (``python -m packlora.train``).

1. **Split.** The 3,434 世说新语 rewrite chats (``data/shishuo/stage2_rewrite.jsonl``) are shuffled
   with seed 0: the first ``--heldout`` are the held-out prompts of every row, the rest the
   stage-2 training chats.
2. **Base** (= the stage-1 checkpoint). A byte-level BPE tokenizer with the ChatML specials and a
   Qwen2-architecture model, pre-trained in full (``lora: null``, ``data.stage: pretrain``) on all
   the bundled text: the Zhang Henshui chapters, the 世说新语 text and the classical/modern pairs
   (one document per pair, modern then classical). Decontaminated: the held-out chats' answers are
   cut out of the 世说新语 text and their pairs left out; those pairs and 1 in 30 Zhang Henshui
   chapters are the held-out text whose loss per token is reported. Cached in
   ``~/.cache/packlora/behaviour-base/<key>`` (``--base-cache``), where ``<key>`` is a hash of
   the base spec, the training text and this script's ``BASE_RECIPE``; rebuilt only when one
   changes (or with ``--rebuild-base``).
3. **Rows**, each for ``--seeds`` training seeds, all from the cached base, LoRA on every
   projection:
   (a) legacy: ``data.labels: legacy_full_sequence`` (whole ChatML text trained, packed without
       isolation: the bug), all training chats;
   (b) the correction as the seed prescribes it: ``init_from`` the stage-1 checkpoint, assistant-only
       labels with isolation, on the 20% ``packlora subset`` of the training chats (its seed = the
       run's), lr 8e-5, one epoch, 8 rows per step, 20 warmup steps (``configs/*/stage2_correction.yaml``);
   (c) the same correction trained to convergence on all training chats (the epochs and lr that
       minimise the held-out loss of this model size; the per-epoch held-out loss is reported);
   (d) (c) with the ``shishuo`` preset: its guard sentence appended to every system prompt, in
       training and in decoding.
4. **Decoding**, greedy and with Qwen2.5-Instruct's sampling settings (its generation_config.json:
   temperature 0.7, top_p 0.8, top_k 20, repetition_penalty 1.05; seed = the run's), ``max_new_tokens``
   fixed. Each prompt is decoded once with the chat-unaware stop ids (``<|endoftext|>`` only, as
   ``--no-stop-ids``); the reply a decoder with the checkpoint's stop ids returns is that reply
   cut at its first stop id: the same tokens, since every token before the stop is generated from
   the same inputs and (sampling) the same random draws. The script checks this on one model per
   run by decoding with the stop ids directly and comparing, and says so in the doc.
5. **Statistics.** Per row and decoder, replies of all seeds pooled (same number per seed, so the
   pooled rate is the mean of the seeds' rates) with a 95% Wilson score interval
   (``decoding/stats.py``); per-seed rates beside them. Runaway = role leak (a new turn is
   written) + loop (never ends, no new turn; ``decoding/runaway.py`` names the repeated unit).

Every run and report lands under ``--work-dir``; a step whose output exists from the same settings
is reused, ``--fresh`` starts the work dir over (the base cache is kept). The doc above the
hand-written notes marker is rewritten; the notes below it are kept.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CHATS = SHARED / "data" / "shishuo" / "stage2_rewrite.jsonl"
SHISHUO_TEXT = SHARED / "data" / "shishuo" / "stage1_text.jsonl"
ZHANG_TEXT = SHARED / "data" / "zhanghenshui" / "stage1_text.jsonl"
PAIRS = SHARED / "assets" / "raw" / "classical_modern" / "shishuoxinyu_pairs.jsonl"
CHAT_TEMPLATE = SHARED / "assets" / "qwen2-tokenizer" / "chat_template.jinja"
DOC = REPO / "docs" / "behaviour-boundary.md"
NOTES_MARKER = "<!-- Hand-written notes below this line are kept by scripts/behaviour_boundary.py -->"
PRESET = "shishuo"
SPLIT_SEED = 0
ZHANG_HELDOUT_EVERY = 30  # 1 in 30 chapters is held-out text for the base's loss
BASE_RECIPE = 1  # bump when the way the base's text or tokenizer is made changes
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QWEN_SAMPLING = dict(do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)
DECODERS = {"greedy": {}, "sampling": QWEN_SAMPLING}


def decoder_sampling(settings: dict, seed: int):
    """The ``decoding.generate.Sampling`` of a ``DECODERS`` entry; sampled ones are seeded with ``seed``."""
    from packlora.decoding.generate import GREEDY, Sampling

    return Sampling(**settings, seed=seed) if settings else GREEDY


@dataclass(frozen=True)
class BaseSpec:
    """The stage-1 base: tokenizer size, model config and pre-training settings."""

    vocab_size: int
    model: dict
    max_steps: int
    batch_rows: int
    max_seq_length: int
    learning_rate: float
    warmup_ratio: float = 0.03
    weight_decay: float = 0.1
    needs_cuda: bool = False


def _qwen2(hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int) -> dict:
    return dict(model_type="qwen2", hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=1024,
                tie_word_embeddings=True)


BASES = {
    # 2 CPU cores: sized so that the 12 stage-2 runs and 24 decodes on it fit 45 minutes (see the doc).
    "small": BaseSpec(vocab_size=4096, model=_qwen2(256, 4, 688, 4, 2), max_steps=1000, batch_rows=8,
                      max_seq_length=512, learning_rate=2e-3),
    # One GPU (untested: no GPU was at hand): 3x the width, 2x the depth, ~10 epochs over the text.
    "large": BaseSpec(vocab_size=8192, model=_qwen2(768, 12, 2048, 12, 4), max_steps=1000, batch_rows=32,
                      max_seq_length=512, learning_rate=6e-4, needs_cuda=True),
    "quick": BaseSpec(vocab_size=1024, model=_qwen2(64, 2, 128, 2, 1), max_steps=20, batch_rows=4,
                      max_seq_length=256, learning_rate=3e-3),
}


@dataclass(frozen=True)
class Plan:
    """The stage-2 rows, decoding and statistics settings."""

    seeds: tuple[int, ...]
    heldout: int
    max_new_tokens: int
    converge_epochs: int  # (a), (c), (d)
    converge_lr: float
    rows_per_step: int = 8  # as in configs/shishuo/stage2*.yaml: 1 row x 8 accumulation
    lora_r: int = 32
    correction_ratio: float = 0.2
    correction_lr: float = 8e-5
    correction_warmup_steps: int = 20
    decode_batch: int = 120
    train_limit: int | None = None  # stage-2 training chats (None: all but the held-out ones)


PLANS = {
    # max_new_tokens: reference answers are 18 tokens (median), 50 (p99), 102 at most.
    "full": Plan(seeds=(0, 1, 2), heldout=240, max_new_tokens=128, converge_epochs=2, converge_lr=2e-3),
    "quick": Plan(seeds=(0, 1), heldout=24, max_new_tokens=24, converge_epochs=2, converge_lr=2e-3,
                  decode_batch=12, train_limit=240),
}


@dataclass(frozen=True)
class Row:
    key: str
    title: str
    labels: str
    data: str  # "all" or "subset"
    preset: str | None = None


ROWS = (
    Row("legacy", "(a) legacy labels, naive packing", "legacy_full_sequence", "all"),
    Row("correction", "(b) correction: 20% subset, lr 8e-5, 1 epoch", "assistant_only", "subset"),
    Row("converged", "(c) correction to convergence, all chats", "assistant_only", "all"),
    Row("guard", "(d) = (c) + the guard sentence", "assistant_only", "all", PRESET),
)


# ---------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work-dir", default=None, help="default runs/behaviour-boundary (--quick: runs/behaviour-boundary-quick)")
    ap.add_argument("--base-cache", default=str(Path.home() / ".cache" / "packlora" / "behaviour-base"))
    ap.add_argument("--base", choices=["small", "large"], default="small",
                    help="small: the 2-CPU base of the doc; large: a bigger base, needs a GPU")
    ap.add_argument("--rebuild-base", action="store_true", help="pre-train the base again even if it is cached")
    ap.add_argument("--base-only", action="store_true", help="stop once the base is cached (and print its report)")
    ap.add_argument("--quick", action="store_true", help="development: tiny base, 2 seeds, 24 prompts")
    ap.add_argument("--fresh", action="store_true", help="delete --work-dir first (never the base cache)")
    ap.add_argument("--doc", default=None, help=f"default {DOC.relative_to(REPO)} (--quick: WORK_DIR/behaviour-boundary.md)")
    args = ap.parse_args(argv)
    spec = BASES["quick" if args.quick else args.base]
    plan = PLANS["quick" if args.quick else "full"]
    if spec.needs_cuda:
        import torch

        if not torch.cuda.is_available():
            ap.error("--base large needs a CUDA GPU (torch.cuda.is_available() is False); use --base small on CPU")
    work = Path(args.work_dir or REPO / "runs" / ("behaviour-boundary-quick" if args.quick else "behaviour-boundary"))
    doc = Path(args.doc) if args.doc else (work / "behaviour-boundary.md" if args.quick else DOC)
    if args.fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    clock = Clock()

    with clock.phase("split"):
        train_file, heldout_file = split_chats(work, plan.heldout, plan.train_limit)
    with clock.phase("base"):
        base = ensure_base(spec, Path(args.base_cache), heldout_file, args.rebuild_base)
    if args.base_only:
        print(json.dumps(base.report, indent=1, ensure_ascii=False))
        return 0
    with clock.phase("stage 2 training"):
        runs = {}
        for row in ROWS:
            for seed in plan.seeds:
                runs[row.key, seed] = train_row(work, row, seed, plan, base, train_file)
    with clock.phase("decoding and held-out loss"):
        results = {}
        for row in ROWS:
            for seed in plan.seeds:
                results[row.key, seed] = evaluate_run(runs[row.key, seed], row, seed, plan, heldout_file)
        check = stop_id_check(runs["converged", plan.seeds[0]], ROWS[2], plan.seeds[0], plan, heldout_file,
                              results["converged", plan.seeds[0]])
    clock.finish()
    write_doc(doc, spec, plan, base, runs, results, check, clock, args)
    print(f"wrote {doc}")
    return 0


# ---------------------------------------------------------------------------------------- data


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")


def split_chats(work: Path, n_heldout: int, n_train: int | None = None) -> tuple[Path, Path]:
    """A seeded, disjoint split of the rewrite chats: held-out prompts and stage-2 training chats."""
    lines = CHATS.read_text(encoding="utf-8").splitlines()
    order = list(range(len(lines)))
    random.Random(SPLIT_SEED).shuffle(order)
    train_file, heldout_file = work / "train_chats.jsonl", work / "heldout_chats.jsonl"
    _write_jsonl(heldout_file, [json.loads(lines[i]) for i in order[:n_heldout]])
    train = order[n_heldout:] if n_train is None else order[n_heldout : n_heldout + n_train]
    _write_jsonl(train_file, [json.loads(lines[i]) for i in train])
    return train_file, heldout_file


def base_text(heldout_file: Path, with_zhanghenshui: bool = True) -> tuple[list[dict], dict[str, list[str]], dict]:
    """The base's training documents, its held-out texts by source, and the counts.

    Every assistant answer and user passage of the held-out chats is cut out of the 世说新语 text,
    and a pair whose classical or modern text is one of them is held out, so the base never saw
    the held-out prompts or their answers. ``with_zhanghenshui=False`` trains on the 世说新语 text
    and pairs only (the Zhang Henshui chapters still give a held-out loss).
    """
    answers, passages = set(), set()
    for chat in _jsonl(heldout_file):
        for m in chat["messages"]:
            if m["role"] == "assistant":
                answers.add(m["content"].strip())
            elif m["role"] == "user":
                passages.add(m["content"].split("\n", 1)[-1].strip())
    train, heldout = [], {"zhanghenshui": [], "shishuo pairs": []}
    counts = Counter()
    for i, rec in enumerate(_jsonl(ZHANG_TEXT)):
        if i % ZHANG_HELDOUT_EVERY == ZHANG_HELDOUT_EVERY - 1:
            heldout["zhanghenshui"].append(rec["text"])
        elif with_zhanghenshui:
            train.append({"text": rec["text"]})
    counts["zhanghenshui chapters"] = len(train)
    for rec in _jsonl(SHISHUO_TEXT):
        text = rec["text"]
        for a in answers:
            if a in text:
                counts["held-out answers cut from the 世说新语 text"] += text.count(a)
                text = text.replace(a, "")
        train.append({"text": text})
        counts["世说新语 text lines"] += 1
    seen = set()
    for rec in _jsonl(PAIRS):
        classical, modern = rec["classical"].strip(), rec["modern"].strip()
        text = modern + "\n" + classical
        if classical in answers or modern in passages:
            heldout["shishuo pairs"].append(text)
            counts["pairs held out (a held-out chat's)"] += 1
        elif text in seen:
            counts["duplicate pairs dropped"] += 1
        else:
            seen.add(text)
            train.append({"text": text})
            counts["pairs"] += 1
    return train, heldout, dict(counts)


def build_tokenizer(out_dir: Path, texts: list[str], vocab_size: int, role_word_repeats: int = 0) -> None:
    """Byte-level BPE on the base's text; ``<|endoftext|>`` = 0 (eos and pad, as in Qwen2 base
    tokenizers), ``<|im_start|>`` = 1, ``<|im_end|>`` = 2; the Qwen2 ChatML template.
    ``role_word_repeats``: the line ``system user assistant`` added that many more times, so that
    each role name becomes one token, as in Qwen2's tokenizer (else a small vocabulary spells them
    letter by letter)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from packlora.presets import load_preset

    preset = load_preset(PRESET)
    extra = ["system\nuser\nassistant\n", preset.system_prompt, preset.guard, "请把下面这段现代文改写成《世说新语》的文言笔法："]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts + extra * 20 + [extra[0]] * role_word_repeats, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = CHAT_TEMPLATE.read_text()
    fast.save_pretrained(out_dir)


# ---------------------------------------------------------------------------------------- base


@dataclass
class BaseInfo:
    path: Path  # the stage-1 checkpoint (a full model with its tokenizer)
    key: str
    report: dict  # written once, when the base was built


def ensure_base(spec: BaseSpec, cache_root: Path, heldout_file: Path, rebuild: bool, *,
                with_zhanghenshui: bool = True, attn_implementation: str = "sdpa", role_word_repeats: int = 0,
                command: str = "python scripts/behaviour_boundary.py --rebuild-base") -> BaseInfo:
    """The cached base for ``spec`` and this held-out split, pre-training it first if needed.

    Built under ``<key>.partial`` and renamed when complete, so a cache entry is never half a base.
    ``with_zhanghenshui`` (``base_text``), ``attn_implementation`` (of the pre-training run) and
    ``role_word_repeats`` (``build_tokenizer``) are for ``scripts/see_it_stop.py``; the key names them
    only when they differ from this script's.
    """
    train, heldout, counts = base_text(heldout_file, with_zhanghenshui)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in train)
    recipe = {"recipe": BASE_RECIPE, "spec": dataclasses.asdict(spec),
              "train_text_sha256": hashlib.sha256(text.encode()).hexdigest(),
              "chat_template_sha256": hashlib.sha256(CHAT_TEMPLATE.read_bytes()).hexdigest()}
    if attn_implementation != "sdpa":
        recipe["attn_implementation"] = attn_implementation
    if role_word_repeats:
        recipe["role_word_repeats"] = role_word_repeats
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    final = cache_root / key
    if rebuild and final.exists():
        shutil.rmtree(final)
    if (final / "base_report.json").is_file():
        print(f"base: cached {final}", flush=True)
        return BaseInfo(final / "stage1", key, json.loads((final / "base_report.json").read_text()))
    tmp = cache_root / f"{key}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "recipe.json").write_text(json.dumps(recipe, indent=1))
    (tmp / "train_text.jsonl").write_text(text, encoding="utf-8")
    t0, cpu0 = time.time(), _cpu_seconds()
    build_tokenizer(tmp / "tokenizer", [r["text"] for r in train], spec.vocab_size, role_word_repeats)
    steps = spec.max_steps
    config = {
        "output_dir": str(tmp / "stage1"), "seed": 0, "deepspeed": None,
        "model": {"config": spec.model, "tokenizer": str(tmp / "tokenizer"), "attn_implementation": attn_implementation},
        "lora": None,
        "data": {"train": [str(tmp / "train_text.jsonl")], "stage": "pretrain", "max_seq_length": spec.max_seq_length},
        "training": dict(max_steps=steps, per_device_train_batch_size=spec.batch_rows, learning_rate=spec.learning_rate,
                         lr_scheduler_type="cosine", warmup_steps=spec.warmup_ratio, weight_decay=spec.weight_decay,
                         logging_steps=25, save_strategy="no", report_to=[]),
    }
    _train(tmp / "stage1.yaml", config, tmp / "stage1.log")
    seconds, cpu = time.time() - t0, _cpu_seconds() - cpu0
    data_report = json.loads((tmp / "stage1" / "data_report.json").read_text())
    report = {
        "key": key, "built": time.strftime("%Y-%m-%d %H:%M"), "wall_s": round(seconds), "cpu_s": round(cpu),
        "load": Clock.load_now(), "text_counts": counts, "data_report": _brief_data_report(data_report),
        "train_loss_last": _last_train_loss(tmp / "stage1.log"),
        "heldout": heldout_text_loss(tmp / "stage1", heldout, spec.max_seq_length),
        "params": _num_params(tmp / "stage1"),
        "command": command,
    }
    (tmp / "base_report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    shutil.rmtree(tmp / "stage1" / "base_model", ignore_errors=True)  # the random init training started from
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    # The run's config names the .partial paths; the model reads them only at training time.
    print(f"base: built {final} in {seconds / 60:.1f} min", flush=True)
    return BaseInfo(final / "stage1", key, report)


def _brief_data_report(r: dict) -> dict:
    keys = ("records", "examples", "split_chunks", "rows", "packing_efficiency", "supervised_tokens")
    return {k: r[k] for k in keys if k in r}


def _last_train_loss(log: Path) -> float | None:
    """Mean of the last 4 training losses the Trainer logged (``{'loss': '5.747', ...}``)."""
    losses = [float(x) for x in re.findall(r"\{'loss': '([0-9.]+)'", log.read_text(errors="replace"))]
    return round(sum(losses[-4:]) / len(losses[-4:]), 3) if losses else None


def _num_params(model_dir: Path) -> int:
    from safetensors import safe_open

    n = 0
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                size = 1
                for d in st.get_slice(k).get_shape():
                    size *= d
                n += size
    return n


def heldout_text_loss(model_dir: Path, heldout: dict[str, list[str]], max_seq_length: int) -> dict:
    """Mean next-token loss (nats) per token and per character on held-out text, per source.

    Each document is tokenised as in pre-training (EOS appended) and cut into chunks of
    ``max_seq_length``; every token but a chunk's first is predicted (as the trained labels are).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from packlora.data_utils.tokenize_text import split_segment, tokenize_text

    tok = AutoTokenizer.from_pretrained(model_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    out = {}
    for source, texts in heldout.items():
        nll, tokens, chars = 0.0, 0, 0
        for text in texts:
            chars += len(text)
            for seg in split_segment(tokenize_text(text, tok, tok.eos_token_id), max_seq_length):
                ids = torch.tensor([seg.input_ids], device=device)
                if ids.shape[1] < 2:
                    continue
                with torch.no_grad():
                    logits = model(input_ids=ids).logits[0, :-1].float()
                nll += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
                tokens += ids.shape[1] - 1
        out[source] = {"documents": len(texts), "tokens": tokens, "chars": chars,
                       "loss_per_token": round(nll / tokens, 4), "bits_per_char": round(nll / chars / 0.693147, 4)}
    return out


# ---------------------------------------------------------------------------------------- stage 2


@dataclass
class RunInfo:
    path: Path
    config: dict
    seconds: float
    steps: int | None
    data_report: dict = field(default_factory=dict)


def train_row(work: Path, row: Row, seed: int, plan: Plan, base: BaseInfo, train_file: Path) -> RunInfo:
    """Train one row for one seed (reused if done with the same config)."""
    out = work / f"{row.key}-s{seed}"
    data_file = train_file
    if row.data == "subset":
        data_file = work / f"correction_subset-s{seed}.jsonl"
        _run_logged([sys.executable, "-m", "packlora", "subset", "--input", str(train_file), "--output",
                     str(data_file), "--ratio", str(plan.correction_ratio), "--seed", str(seed),
                     "--tokenizer", str(base.path)], None)
    if row.data == "subset":
        training = dict(num_train_epochs=1, learning_rate=plan.correction_lr, warmup_steps=plan.correction_warmup_steps,
                        save_strategy="epoch")
    else:
        training = dict(num_train_epochs=plan.converge_epochs, learning_rate=plan.converge_lr, warmup_steps=0.05,
                        save_strategy="epoch", save_total_limit=plan.converge_epochs)
    config = {
        "output_dir": str(out), "seed": seed, "deepspeed": None,
        "init_from": str(base.path), "init_mode": "merge", "preset": row.preset,
        "model": {"name_or_path": str(base.path), "attn_implementation": "sdpa"},
        "lora": {"r": plan.lora_r, "alpha": 2 * plan.lora_r, "dropout": 0.05, "target_modules": LORA_TARGETS},
        "data": {"train": [str(data_file)], "stage": "sft", "max_seq_length": 512, "labels": row.labels,
                 "overflow": "drop"},
        "training": dict(per_device_train_batch_size=plan.rows_per_step, lr_scheduler_type="cosine",
                         weight_decay=0.0, logging_steps=5, report_to=[], **training),
        "decoding": {"max_new_tokens": plan.max_new_tokens},
        "_data_sha256": hashlib.sha256(data_file.read_bytes()).hexdigest(),  # not a packlora key; see _train
    }
    done = out / "run_info.json"
    if done.is_file() and json.loads(done.read_text())["config"] == config:
        info = json.loads(done.read_text())
        return RunInfo(out, config, info["seconds"], info["steps"], info["data_report"])
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t0 = time.time()
    _train(work / f"{row.key}-s{seed}.yaml", config, out / "train.log")
    seconds = time.time() - t0
    steps = max((int(c.name.split("-")[1]) for c in out.glob("checkpoint-*")), default=None)
    data_report = _brief_data_report(json.loads((out / "data_report.json").read_text()))
    data_report["train_loss_last"] = _last_train_loss(out / "train.log")
    info = {"config": config, "seconds": round(seconds, 1), "steps": steps, "data_report": data_report}
    done.write_text(json.dumps(info, indent=1, ensure_ascii=False))
    return RunInfo(out, config, seconds, steps, data_report)


def _train(config_path: Path, config: dict, log: Path) -> None:
    clean = {k: v for k, v in config.items() if not k.startswith("_")}
    config_path.write_text(yaml.safe_dump(clean, allow_unicode=True, sort_keys=False), encoding="utf-8")
    _run_logged([sys.executable, "-m", "packlora.train", str(config_path)], log)


def _run_logged(cmd: list[str], log: Path | None) -> None:
    print("+", " ".join(cmd), flush=True)
    t = time.time()
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if log is None:
        subprocess.run(cmd, cwd=REPO, check=True, env=env)
    else:
        with open(log, "w") as f:
            proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
        if proc.returncode:
            tail = log.read_text(errors="replace").splitlines()[-30:]
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}); last lines of {log}:\n" + "\n".join(tail))
    print(f"  ({time.time() - t:.0f} s)", flush=True)


# ---------------------------------------------------------------------------------------- evaluation


def _prompts(heldout_file: Path, row: Row):
    from packlora.decoding.decode import read_prompts
    from packlora.presets import apply_preset, load_preset

    prompts = read_prompts(heldout_file)
    if row.preset:
        preset = load_preset(row.preset)
        prompts = [dataclasses.replace(p, messages=tuple(apply_preset(p.messages, preset)[0])) for p in prompts]
    return prompts


def with_stop_ids(reply, stop_ids, max_new_tokens: int, tokenizer):
    """The reply a decoder with ``stop_ids`` returns, cut from ``reply`` decoded with a subset of them."""
    from packlora.decoding.generate import Reply
    from packlora.decoding.stopping import cut_at_first_stop

    ids = list(reply.token_ids) + ([reply.stop_id] if reply.stop_id is not None else [])
    kept, stop = cut_at_first_stop(ids, stop_ids)
    text = tokenizer.decode(list(kept), skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if stop is None:
        return Reply(text, kept, "max_new_tokens", None, max_new_tokens)
    return Reply(text, kept, "stop_id", stop, len(kept) + 1)


def evaluate_run(run: RunInfo, row: Row, seed: int, plan: Plan, heldout_file: Path) -> dict:
    """Held-out loss, then every prompt decoded by each decoder, scored with and without stop ids.

    Returns ``{"heldout_loss", "loss_by_epoch", "decoders": {name: {"stop_ids": [...], "no_stop_ids": [...]}}}``,
    each list one ``PromptResult`` dict per prompt (cached in ``run/eval.json``).
    """
    cache = run.path / "eval.json"
    key = {"max_new_tokens": plan.max_new_tokens, "decoders": DECODERS, "batch": plan.decode_batch, "seed": seed,
           "prompts": hashlib.sha256(heldout_file.read_bytes()).hexdigest(), "run_seconds": round(run.seconds, 1)}
    if cache.is_file() and json.loads(cache.read_text()).get("key") == key:
        return json.loads(cache.read_text())
    import dataclasses as dc

    from packlora.decoding.generate import generate_replies, load_checkpoint
    from packlora.decoding.runaway import naive_stop_ids, score_reply

    t0 = time.time()
    prompts = _prompts(heldout_file, row)
    ckpt = load_checkpoint(run.path, device="cuda" if _cuda() else "cpu")
    out = {"key": key, "heldout_loss": assistant_loss(ckpt.model, ckpt.fmt, heldout_file, row),
           "loss_by_epoch": {}, "decoders": {}, "stop_ids": list(ckpt.stop_ids)}
    for name, settings in DECODERS.items():
        sampling = decoder_sampling(settings, seed)
        replies = generate_replies(
            ckpt.model, ckpt.fmt, [list(p.messages) for p in prompts], naive_stop_ids(ckpt.fmt),
            max_new_tokens=plan.max_new_tokens, batch_size=plan.decode_batch, sampling=sampling)
        scored = {"no_stop_ids": [], "stop_ids": []}
        for p, r in zip(prompts, replies, strict=True):
            src = str(p.source)
            scored["no_stop_ids"].append(dc.asdict(score_reply(r, p.reference, ckpt.fmt, src)))
            cut = with_stop_ids(r, ckpt.stop_ids, plan.max_new_tokens, ckpt.fmt.tokenizer)
            scored["stop_ids"].append(dc.asdict(score_reply(cut, p.reference, ckpt.fmt, src)))
        out["decoders"][name] = scored
    for ckpt_dir in sorted(run.path.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])):
        c = load_checkpoint(ckpt_dir, device="cpu")
        out["loss_by_epoch"][ckpt_dir.name] = assistant_loss(c.model, c.fmt, heldout_file, row)
    out["seconds"] = round(time.time() - t0, 1)
    cache.write_text(json.dumps(out, ensure_ascii=False))
    print(f"  evaluated {run.path.name} in {out['seconds']:.0f} s", flush=True)
    return out


def assistant_loss(model, fmt, heldout_file: Path, row: Row) -> float:
    """Mean loss (nats) per trained token of the held-out chats, assistant-only labels (the
    preset's guard applied for a preset row): how well each model predicts the answers and their
    ``<|im_end|>``, whatever labels it was trained with."""
    import torch

    from packlora.presets import apply_preset, load_preset

    preset = load_preset(row.preset) if row.preset else None
    device = next(model.parameters()).device
    nll, n = 0.0, 0
    was_training = model.training
    model.eval()
    for chat in _jsonl(heldout_file):
        messages = apply_preset(chat["messages"], preset)[0] if preset else chat["messages"]
        for seg in fmt.encode_chat(messages).examples:
            ids = torch.tensor([seg.input_ids], device=device)
            labels = torch.tensor([seg.labels[1:]], device=device)
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits, labels[0], ignore_index=-100, reduction="sum").item()
            n += int((labels != -100).sum())
    model.train(was_training)
    return round(nll / n, 4)


def stop_id_check(run: RunInfo, row: Row, seed: int, plan: Plan, heldout_file: Path, result: dict) -> dict:
    """Decode with the checkpoint's stop ids directly and compare with the replies cut from the
    no-stop-ids decode, per decoder: the count of prompts whose reply is identical."""
    cache = run.path / "stop_id_check.json"
    if cache.is_file() and json.loads(cache.read_text()).get("run_seconds") == round(run.seconds, 1):
        return json.loads(cache.read_text())
    from packlora.decoding.generate import generate_replies, load_checkpoint

    prompts = _prompts(heldout_file, row)
    ckpt = load_checkpoint(run.path, device="cuda" if _cuda() else "cpu")
    out = {"run": run.path.name, "run_seconds": round(run.seconds, 1), "prompts": len(prompts)}
    for name, settings in DECODERS.items():
        sampling = decoder_sampling(settings, seed)
        # the same batches as the evaluation: sampled replies depend on the batch's composition
        direct = generate_replies(ckpt.model, ckpt.fmt, [list(p.messages) for p in prompts], ckpt.stop_ids,
                                  max_new_tokens=plan.max_new_tokens, batch_size=plan.decode_batch, sampling=sampling)
        cut = result["decoders"][name]["stop_ids"]
        out[name] = sum(d.text == c["reply"] and d.stop_reason == c["stop_reason"] for d, c in zip(direct, cut))
    cache.write_text(json.dumps(out))
    return out


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# ---------------------------------------------------------------------------------------- timing


class Clock:
    """Wall and CPU time per phase, and the machine's load average sampled every 10 s."""

    def __init__(self):
        self.t0, self.cpu0 = time.time(), _cpu_seconds()
        self.phases: dict[str, float] = {}
        self.loads: list[float] = []
        self.start_load = self.load_now()
        self._stop = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self):
        while not self._stop.wait(10):
            self.loads.append(os.getloadavg()[0])

    @staticmethod
    def load_now() -> dict:
        one, five, fifteen = os.getloadavg()
        return {"nproc": os.cpu_count(), "load_1_5_15": [round(one, 2), round(five, 2), round(fifteen, 2)],
                "time": time.strftime("%Y-%m-%d %H:%M")}

    class _Phase:
        def __init__(self, clock, name):
            self.clock, self.name = clock, name

        def __enter__(self):
            self.t = time.time()

        def __exit__(self, *exc):
            self.clock.phases[self.name] = time.time() - self.t

    def phase(self, name: str):
        return Clock._Phase(self, name)

    def finish(self):
        self._stop.set()
        self.wall = time.time() - self.t0
        self.cpu = _cpu_seconds() - self.cpu0
        self.end_load = self.load_now()


def _cpu_seconds() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


# ---------------------------------------------------------------------------------------- the doc


def _rate(results: list[dict], pred):
    from packlora.decoding.stats import Rate

    return Rate(sum(1 for r in results if pred(r)), len(results))


def _pooled(results, row, decoder, mode, seeds):
    return [r for s in seeds for r in results[row, s]["decoders"][decoder][mode]]


def _per_seed(results, row, decoder, mode, seeds, pred):
    rates = []
    for s in seeds:
        rs = results[row, s]["decoders"][decoder][mode]
        rates.append(f"{100 * sum(1 for r in rs if pred(r)) / len(rs):.0f}")
    return " / ".join(rates)


def _units(rs: list[dict], k: int = 4) -> str:
    c = Counter(r["repeated_unit"] for r in rs if r["loop"] and r["repeated_unit"])
    if not c:
        return "-"
    return ", ".join(f"`{_md(u)}` ×{n}" for u, n in c.most_common(k))


def _md(text: str) -> str:
    return text.replace("\n", "\\n").replace("|", "\\|").replace("`", "'")


def _verdict(ok: bool) -> str:
    return "**holds**" if ok else "**does not hold**"


def write_doc(path: Path, spec: BaseSpec, plan: Plan, base: BaseInfo, runs, results, check, clock, args) -> None:
    seeds = plan.seeds
    n_per = plan.heldout * len(seeds)
    runaway, leak, loop = (lambda r: r["runaway"]), (lambda r: r["role_leak"]), (lambda r: r["loop"])
    lines = []
    for decoder in DECODERS:
        lines.append(f"\n**{decoder.capitalize()}**"
                     + (" (temperature 0.7, top_p 0.8, top_k 20, repetition_penalty 1.05)" if decoder != "greedy" else "")
                     + f": each rate over {len(seeds)} seeds x {plan.heldout} prompts = {n_per} replies, "
                       "95% Wilson interval in brackets\n")
        lines.append("| row | stop ids | runaway | role leak | loop | runaway per seed (%) | emitted `<\\|im_end\\|>` | most repeated units of the loops |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for row in ROWS:
            modes = ("no_stop_ids", "stop_ids") if row.key == "legacy" else ("stop_ids",)
            for mode in modes:
                rs = _pooled(results, row.key, decoder, mode, seeds)
                lines.append(f"| {row.title} | {'yes' if mode == 'stop_ids' else '**no**'} | {_rate(rs, runaway)} "
                             f"| {_rate(rs, leak)} | {_rate(rs, loop)} | {_per_seed(results, row.key, decoder, mode, seeds, runaway)} "
                             f"| {100 * _rate(rs, lambda r: r['emitted_end_of_turn']).rate:.0f}% | {_units(rs)} |")
    main_table = "\n".join(lines)

    detail = ["| row | decoder | stop ids | runaway | role leak | loop | loops with a repeated unit | hit max_new_tokens | mean length ratio |",
              "|---|---|---|---|---|---|---|---|---|"]
    for row in ROWS:
        for decoder in DECODERS:
            for mode in ("no_stop_ids", "stop_ids"):
                rs = _pooled(results, row.key, decoder, mode, seeds)
                loops = [r for r in rs if r["loop"]]
                with_unit = sum(1 for r in loops if r["repeated_unit"])
                ratios = [r["length_ratio"] for r in rs if r["length_ratio"] is not None]
                detail.append(f"| {row.key} | {decoder} | {'yes' if mode == 'stop_ids' else 'no'} | {_rate(rs, runaway)} "
                              f"| {_rate(rs, leak)} | {_rate(rs, loop)} | {with_unit}/{len(loops)} "
                              f"| {100 * _rate(rs, lambda r: r['hit_max_new_tokens']).rate:.1f}% | {sum(ratios) / len(ratios):.2f} |")
    detail_table = "\n".join(detail)

    training = ["| row | seed | steps | chats | trained tokens | train time | last train loss | held-out loss per answer token | by epoch |",
                "|---|---|---|---|---|---|---|---|---|"]
    for row in ROWS:
        for s in seeds:
            r, e = runs[row.key, s], results[row.key, s]
            by_epoch = " → ".join(f"{v:.3f}" for v in e["loss_by_epoch"].values()) or "-"
            last = r.data_report.get("train_loss_last")
            training.append(f"| {row.key} | {s} | {r.steps or '-'} | {r.data_report.get('examples', '-')} | "
                            f"{r.data_report.get('supervised_tokens', '-')} | {r.seconds / 60:.1f} min | "
                            f"{'-' if last is None else f'{last:.3f}'} | {e['heldout_loss']:.3f} | {by_epoch} |")
    training_table = "\n".join(training)

    # the claims
    leg_n = _pooled(results, "legacy", "greedy", "no_stop_ids", seeds)
    leg_s = _pooled(results, "legacy", "greedy", "stop_ids", seeds)
    claims = []
    for decoder in DECODERS:
        n_rate = _rate(_pooled(results, "legacy", decoder, "no_stop_ids", seeds), runaway)
        s_rate = _rate(_pooled(results, "legacy", decoder, "stop_ids", seeds), runaway)
        if n_rate.k:
            red = 1 - s_rate.rate / n_rate.rate
            lo = 1 - s_rate.interval[1] / max(n_rate.interval[0], 1e-9)
            hi = 1 - s_rate.interval[0] / n_rate.interval[1]
            claims.append(f"- {decoder}: stop ids cut the legacy model's runaway from {n_rate} to {s_rate}: "
                          f"a {100 * red:.0f}% reduction (between {100 * max(lo, -9.99):.0f}% and {100 * hi:.0f}% "
                          "if both rates lie in their intervals). Claim 1 (about 90%) "
                          f"{_verdict(red >= 0.85)}.")
        else:
            claims.append(f"- {decoder}: the legacy model did not run away without stop ids ({n_rate}); nothing to remove.")
    for decoder in DECODERS:
        leak_n = _rate(_pooled(results, "legacy", decoder, "no_stop_ids", seeds), leak)
        claims.append(f"- {decoder}: the legacy model without stop ids leaked a role in {leak_n} of replies "
                      f"(goal >= 90%: {'met' if leak_n.rate >= 0.9 else 'missed'}).")
    for row in ROWS[1:]:
        for decoder in DECODERS:
            r = _rate(_pooled(results, row.key, decoder, "stop_ids", seeds), runaway)
            met = r.rate <= 0.02 and r.interval[1] <= 0.05
            claims.append(f"- {row.title}, {decoder}, with stop ids: runaway {r}. Claim 2 (0%) "
                          f"{_verdict(r.k == 0)}; goal (<= 2%, upper bound <= 5%) {'met' if met else 'missed'}.")
    del leg_n, leg_s

    examples = []
    for row_key, decoder, mode, pred, what in (
        ("legacy", "greedy", "no_stop_ids", leak, "a role leak: legacy, greedy, without stop ids"),
        ("converged", "greedy", "stop_ids", loop, "a loop: (c), greedy, with stop ids"),
        ("correction", "greedy", "stop_ids", loop, "a loop: (b), greedy, with stop ids"),
        ("converged", "greedy", "no_stop_ids", lambda r: True, "what (c) writes after `<|im_end|>` when nothing stops it (greedy)"),
    ):
        rs = [r for r in _pooled(results, row_key, decoder, mode, seeds) if pred(r)]
        if rs:
            r = rs[0]
            unit = f" (repeated unit `{_md(r['repeated_unit'])}`)" if r.get("repeated_unit") else ""
            examples.append(f"{what}, {r['source'].rsplit('/', 1)[-1]}{unit}:\n\n```\n{r['reply'][:360]}\n```\n")
        else:
            examples.append(f"{what}: none.\n")

    hl = base.report["heldout"]
    base_loss = "; ".join(f"{src}: {v['loss_per_token']:.3f} nats/token, {v['bits_per_char']:.3f} bits/char "
                          f"({v['tokens']} tokens of {v['documents']} documents)" for src, v in hl.items())
    counts = ", ".join(f"{k} {v}" for k, v in base.report["text_counts"].items())
    dr = base.report["data_report"]
    stage_times = ", ".join(f"{k} {v / 60:.1f} min" for k, v in clock.phases.items())
    loads = clock.loads or [clock.start_load["load_1_5_15"][0]]
    check_line = (f"checked on {check['run']}: decoding its {check['prompts']} prompts with the stop ids directly gave "
                  + " and ".join(f"{check[d]}/{check['prompts']} identical replies ({d})" for d in DECODERS))
    command = "python scripts/behaviour_boundary.py" + (" --quick" if args.quick else "") + (
        f" --base {args.base}" if args.base != "small" else "")
    params = base.report.get("params")
    text = DOC_TEMPLATE.format(
        command=command, wall=f"{clock.wall / 60:.0f}", cpu=f"{clock.cpu / 60:.0f}", stage_times=stage_times,
        nproc=clock.start_load["nproc"], load_min=f"{min(loads):.1f}", load_max=f"{max(loads):.1f}",
        load_mean=f"{sum(loads) / len(loads):.1f}", when=clock.start_load["time"],
        base_key=base.key, base_cache=args.base_cache, model=json.dumps(spec.model), vocab=spec.vocab_size,
        params=f"{params / 1e6:.1f}M" if params else "?", base_steps=spec.max_steps, base_rows=spec.batch_rows,
        base_seq=spec.max_seq_length, base_lr=spec.learning_rate,
        base_tokens=round(dr.get("rows", 0) * spec.max_seq_length * dr.get("packing_efficiency", 0)),
        base_epochs=f"{spec.max_steps * spec.batch_rows / max(dr.get('rows', 1), 1):.1f}",
        base_wall=f"{base.report['wall_s'] / 60:.0f}", base_cpu=f"{base.report['cpu_s'] / 60:.0f}",
        base_load=base.report["load"]["load_1_5_15"], base_train_loss=base.report.get("train_loss_last"),
        base_loss=base_loss, counts=counts, heldout=plan.heldout, seeds=", ".join(map(str, seeds)),
        n_per=n_per, max_new_tokens=plan.max_new_tokens, epochs=plan.converge_epochs, lr=plan.converge_lr,
        r=plan.lora_r, r2=2 * plan.lora_r, rows_per_step=plan.rows_per_step, main_table=main_table, claims="\n".join(claims),
        detail_table=detail_table, training_table=training_table, examples="\n".join(examples), check=check_line,
    )
    notes = NOTES_MARKER + "\n\n(Explain the measured numbers here; this part is kept when the table is regenerated.)\n"
    if path.is_file() and NOTES_MARKER in path.read_text(encoding="utf-8"):
        notes = NOTES_MARKER + path.read_text(encoding="utf-8").split(NOTES_MARKER, 1)[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + notes, encoding="utf-8")


DOC_TEMPLATE = """# The behaviour boundary: does the model end its turn?

<!-- Generated by scripts/behaviour_boundary.py; edit the script, not this part. -->

    {command}

regenerated this doc in **{wall} min of wall time** ({stage_times}; {cpu} min of CPU time) on a
machine with {nproc} CPU cores **shared with other jobs**: 1-minute load average {load_min}-{load_max}
(mean {load_mean}) while it ran, started {when}. It reuses the cached base; rebuilding that
(`--rebuild-base`, or any change to its spec or text) took {base_wall} min more ({base_cpu} min of
CPU time, load {base_load} when it finished). What each step does: the script's docstring.

**Base** (= the stage-1 checkpoint), cache key `{base_key}` under `{base_cache}`: a {vocab}-token
byte-level BPE tokenizer (ChatML specials, eos `<|endoftext|>` as in Qwen2 base tokenizers) and a
{params}-parameter Qwen2 `{model}`, pre-trained in full for {base_steps} steps of {base_rows} rows x
{base_seq} tokens (lr {base_lr}, cosine; about {base_epochs} epochs over {base_tokens} tokens) on
all the bundled text ({counts}). Last training loss {base_train_loss} nats/token. **Held-out loss:
{base_loss}.**

**Stage 2**: {heldout} held-out 世说新语 rewrite chats (never seen by the base), the rest for
training; LoRA r {r} (alpha {r2}) on every projection, rows of 512 tokens, {rows_per_step} rows per
step. Rows (a), (c), (d): {epochs} epochs at lr {lr} (cosine, 5% warmup), the point where the
held-out loss stops falling (per-epoch losses below). Row (b): as the seed prescribes (20% subset,
lr 8e-5, 1 epoch, 20 warmup steps). Seeds {seeds} for every row (training, subset draw and sampling);
max_new_tokens {max_new_tokens}.

Runaway = **role leak** (the reply writes a new turn: `<|im_start|>` or a bare role line) +
**loop** (the reply never ends and writes no new turn; the unit its end repeats is shown when
there is one). Without stop ids the decoder stops at `<|endoftext|>` only, as a chat-unaware decoder
does; with them at the checkpoint's stop ids (`<|im_end|>`, `<|endoftext|>`). Each prompt is
decoded once without stop ids and the with-stop-ids reply is that reply cut at its first stop id
({check}).
{main_table}

## The seed's claims at this scale

{claims}

## All numbers

Pooled over the seeds, 95% Wilson intervals:

{detail_table}

Training and held-out loss (assistant-only labels on the held-out chats, whatever the row trained
on; "by epoch" = after each epoch):

{training_table}

## Examples

{examples}
"""


if __name__ == "__main__":
    sys.exit(main())
