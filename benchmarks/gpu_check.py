"""The GPU check: exact packed attention in bf16 and training throughput per backend, on one GPU.

Run by ``bash benchmarks/gpu_check.sh`` (at most 8 minutes on one H200; the script installs the
carried wheels first). It writes the ``<!-- gpu -->`` section of ``benchmarks/RESULTS.md`` with the
machine, the versions and the date. Sub-commands (each also runs alone)::

    python benchmarks/gpu_check.py check-wheels          # the wheel list vs constraints.txt and the GPU image
    python benchmarks/gpu_check.py fetch --dest .gpu     # download/build the wheels, copy the assets (needs pip's registry)
    python benchmarks/gpu_check.py run [--dry-run]       # everything below, then the report
    python benchmarks/gpu_check.py exactness --device cuda --out F.json
    python benchmarks/gpu_check.py throughput --stage zero2 --out F.json    # one process, WORLD_SIZE=1

1. **Exactness** (``exactness``): a 2-layer Qwen2 (hidden 256, 4 query / 2 key-value heads of 64),
   LoRA r 8 on all 7 projections with A and B random, two rows of 1,024 tokens holding 7 segments
   (lengths 1 to 517, one row padded). For each backend (``varlen``, ``sdpa`` with its block mask,
   ``flex_attention``, ``packed_sdpa``), in bf16: the packed forward/backward against each example
   run alone through the same backend, for logits (max abs difference over real tokens) and LoRA
   gradients (max over tensors of max|g_packed - g_alone| / max|g_alone|). **Tolerance, from the
   fp32 reference**: each example alone in fp32 (``sdpa``, TF32 off) is the truth; the error bf16
   itself makes there, ``noise = |alone_bf16 - alone_fp32|``, sets ``tol = 2 x noise``. Packing passes
   if it adds no more than twice what bf16 costs anyway. A control runs ``varlen`` with one
   segment spanning the whole flattened batch (no isolation): it must exceed the tolerance, so the check can fail.
2. **End to end** (GPU only): ``packlora launch configs/shishuo_tiny.yaml`` with
   ``attn_implementation: varlen``, bf16, ZeRO-3 on 1 GPU, 6 steps, 2 checkpoints, decoding 4
   held-out prompts on CUDA: packlora itself on that machine's torch.
3. **Throughput** (``throughput``, one process per ZeRO stage): a Qwen2.5-0.5B-shaped model (24
   layers, hidden 896, 14/2 heads, vocabulary 151,936; random weights, seed 0) with the real Qwen2
   tokenizer, LoRA r 16 on all 7 projections, bf16, ``ds_configs/zero{2,3}.json`` on one GPU, through
   packlora's own ``PackloraTrainer`` (``Trainer`` + DeepSpeed). Data: the real shishuo and
   zhanghenshui chats, packed (whole-set BFD) into rows of 4,096 tokens, one row per step; the padded
   baseline takes as many examples per step as a packed row holds on average, padded to the
   longest, with ``sdpa``. ``flex_attention`` rows are padded to 4,096 (one compiled shape). Every
   variant projects and scores only the supervised positions (``model.lm_head_positions:
   supervised``, the default) except ``varlen_full_logits``: ``varlen`` with the full logits
   (``all``, the path before issue 21), so that pair gives the head's effect on peak memory and
   tokens/s at 4,096-token rows. Each variant (in the order padded, sdpa, packed_sdpa, varlen,
   varlen_full_logits, flex_attention, each over both data sets): warm-up steps, then timed steps
   (CUDA-synchronised), in one run whose backend and head are switched between variants; what the
   time budget leaves out is reported as not measured. Figures: supervised tokens/s (labels that
   the loss sees), peak allocated memory over the variant's steps, and MFU.

**MFU** = model FLOPs of the timed steps / (time x peak bf16 FLOP/s). Per step, for the real (not
padding) tokens and segment lengths ``n`` of the batch:

    FLOPs = (4 N_base + 6 N_lora) sum(n) + 6 n_layers n_heads d_head sum(n^2)

``6N`` per token for training a dense model's matmuls (2N forward, 4N backward) is Kaplan et al.
2020, "Scaling Laws for Neural Language Models", sec. 2.1; with the base frozen, its weight
gradients (2N) are not computed, so the base costs ``4 N_base`` and the LoRA matrices ``6 N_lora``.
``N_base`` counts every matmul weight (attention and MLP projections, and the tied LM head);
embeddings lookups are free. The LM head is counted at every real token, as in the ``6N``
convention, although the supervised head projects only the supervised positions: the figure is the
model's FLOPs, not the work the hardware did, so the supervised variants' MFU is the higher for it. Attention is the ``12 n_layers n_heads d_head T`` per token of Chowdhery et al.
2022, "PaLM", appendix B (QK^T and AV, forward and backward), halved for causal masking and taken
per segment (``T = n``, summed over its ``n`` tokens). Peak: 989.4 TFLOP/s dense bf16 for an H100 or
H200 SXM (NVIDIA's datasheets); the measured bf16 matmul rate is reported next to it.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import math
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"

WHEELS_FILE = BENCH / "gpu_wheels.txt"
IMAGE_FILE = BENCH / "gpu_image_packages.txt"
CONSTRAINTS = REPO / "constraints.txt"
CARRY_DIR = ".gpu"  # git-ignored; `carry` it to the GPU machine
CARRY_LIMIT_BYTES = 60 * 2**20  # the device tool carries 64 MiB with the tree; leave room for the tree
GPU_PYTHON = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
              "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
              "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
ASSETS = ("assets/qwen2-tokenizer/tokenizer.json", "assets/qwen2-tokenizer/tokenizer_config.json",
          "assets/qwen2-tokenizer/chat_template.jinja", "data/shishuo/stage2_rewrite.jsonl",
          "data/zhanghenshui/stage2_continue.jsonl")
DATASETS = {"shishuo": "data/shishuo/stage2_rewrite.jsonl", "zhanghenshui": "data/zhanghenshui/stage2_continue.jsonl"}

EXACT_BACKENDS = ("varlen", "sdpa", "packed_sdpa", "flex_attention")  # flex last: it compiles
# Throughput variants in the order they run (each over both data sets): the riskiest and slowest to
# compile last, so that a failure or the time budget costs the fewest figures.
VARIANTS = ("padded", "sdpa", "packed_sdpa", "varlen", "varlen_full_logits", "flex_attention")
VARIANT_ATTN = {"padded": "sdpa", "varlen_full_logits": "varlen"}  # the others: the variant's name
FULL_LOGITS = {"varlen_full_logits"}  # model.lm_head_positions: all (today's path before issue 21); else supervised
QWEN25_05B = dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
                  rms_norm_eps=1e-6, tie_word_embeddings=True)
TINY = dict(model_type="qwen2", vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True)
LORA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12}  # dense, SXM, NVIDIA datasheets


# --------------------------------------------------------------------------- wheel list


@dataclass(frozen=True, slots=True)
class Wheel:
    """One line of ``gpu_wheels.txt``."""

    name: str
    version: str
    role: str  # install | dep | fallback
    why: str


def canonical(name: str) -> str:
    """PEP 503 name: ``Typing_Extensions`` -> ``typing-extensions``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_wheels(path: Path | None = None) -> list[Wheel]:
    """Parse ``name==version role why`` lines of ``path`` (default ``gpu_wheels.txt``).

    Raises:
        ValueError: a line that is not of that form (names the line).
    """
    path = path or WHEELS_FILE
    wheels = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split(None, 2)
        if len(parts) < 2 or "==" not in parts[0] or parts[1] not in ("install", "dep", "fallback"):
            raise ValueError(f"{path}:{n}: expected 'name==version role why' with role install|dep|fallback: {line!r}")
        name, version = parts[0].split("==")
        wheels.append(Wheel(canonical(name), version, parts[1], parts[2] if len(parts) > 2 else ""))
    return wheels


def read_pins(path: Path) -> dict[str, str | None]:
    """``name==version`` (or a bare ``name``) lines -> ``{canonical name: version or None}``."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonical(name)] = version or None
    return pins


def check_wheels(wheel_dir: Path | None = None) -> tuple[list[str], list[str]]:
    """Check ``gpu_wheels.txt`` against ``constraints.txt``, the requirements of each carried package
    (read from this environment's installed metadata, which must be the same version) and the GPU
    image's package list; and, if ``wheel_dir`` exists, the wheel files in it.

    Returns:
        ``(problems, notes)``: problems make the check fail; notes say what the GPU image must provide
        at a version nobody has read.
    """
    import importlib.metadata as md

    from packaging.requirements import Requirement
    from packaging.version import Version

    wheels = read_wheels()
    listed = {w.name: w for w in wheels}
    image = read_pins(IMAGE_FILE)
    problems, notes = [], []
    if len(listed) != len(wheels):
        problems.append("gpu_wheels.txt lists a package twice; pip stops on two versions of one package")
    for name, version in read_pins(CONSTRAINTS).items():
        if name == "torch":
            continue
        if name in listed:
            if listed[name].version != version or listed[name].role != "install":
                problems.append(f"constraints.txt pins {name}=={version}; gpu_wheels.txt has {name}=={listed[name].version} "
                                f"({listed[name].role}); carry the pinned version with role install")
        elif image.get(name) != version:
            problems.append(f"constraints.txt pins {name}=={version}, which is neither carried nor in the GPU image "
                            f"(image: {image.get(name, 'absent')}); add it to gpu_wheels.txt")
    needed_by: dict[str, list[str]] = {}
    unread = []
    for w in wheels:
        texts, source = _requirements(w, wheel_dir)
        if texts is None:
            if w.role == "install":  # constraints.txt installs exactly this version here
                problems.append(f"{w.name}: gpu_wheels.txt has {w.version} but this environment has {source}; "
                                "carry the version packlora is tested with")
            else:  # not pinned by packlora: this environment may have resolved a newer release
                notes.append(f"{w.name}=={w.version}: requirements not checked (this environment has {source}; "
                             "run --fetch to read them from the wheel)")
            unread.append(w.name)
            continue
        for text in texts:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate(GPU_PYTHON):
                continue
            dep = canonical(req.name)
            needed_by.setdefault(dep, []).append(w.name)
            if dep in listed:
                if not req.specifier.contains(listed[dep].version, prereleases=True):
                    problems.append(f"{w.name} needs {text}; gpu_wheels.txt carries {dep}=={listed[dep].version}")
            elif dep in image:
                known = image[dep]
                if known is not None and not req.specifier.contains(known, prereleases=True):
                    problems.append(f"{w.name} needs {text}; the GPU image has {dep}=={known}: carry a wheel")
                elif known is None and str(req.specifier):
                    notes.append(f"{w.name} needs {text}; the GPU image has {dep} at an unread version")
            else:
                problems.append(f"{w.name} needs {text}, which is neither carried nor in the GPU image")
    for w in wheels:
        if w.role != "install" and w.name not in needed_by and not unread:
            problems.append(f"{w.name} ({w.role}) is needed by no carried package; remove it")
        if w.role == "dep" and w.name in image:
            problems.append(f"{w.name} is in the GPU image: role fallback, not dep")
    if wheel_dir is not None and wheel_dir.is_dir():
        files = sorted(p.name for p in wheel_dir.iterdir())
        for w in wheels:  # wheel file names: {name with _}-{version}-{tags}.whl
            hits = [f for f in files if f.endswith(".whl") and canonical(f.split("-")[0]) == w.name]
            if [f.split("-")[1] for f in hits] != [w.version]:
                problems.append(f"{wheel_dir}: expected one wheel of {w.name}=={w.version}, found {hits}")
        stray = [f for f in files if not f.endswith(".whl") or not any(canonical(f.split("-")[0]) == w.name for w in wheels)]
        if stray:
            problems.append(f"{wheel_dir}: files not in gpu_wheels.txt (pip would see them): {stray}")
    return problems, sorted(set(notes))


def unsatisfied_requirements(names: list[str]) -> list[str]:
    """On the machine itself: each requirement of the installed ``names`` that the installed
    packages do not satisfy (what ``pip check`` says, for these packages only)."""
    import importlib.metadata as md

    from packaging.requirements import Requirement

    problems = []
    for name in names:
        try:
            reqs = md.requires(name) or []
        except md.PackageNotFoundError:
            problems.append(f"{name} is not installed")
            continue
        for text in reqs:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            try:
                have = md.version(req.name)
            except md.PackageNotFoundError:
                problems.append(f"{name} needs {text}: not installed")
                continue
            if not req.specifier.contains(have, prereleases=True):
                problems.append(f"{name} needs {text}: {req.name} {have} is installed")
    return problems


def _requirements(w: Wheel, wheel_dir: Path | None) -> tuple[list[str] | None, str]:
    """``Requires-Dist`` of ``w``: from its wheel file in ``wheel_dir`` when there is one, else from
    this environment's installed metadata when it is the same version. ``(None, what is installed)``
    when neither can be read."""
    import importlib.metadata as md
    import zipfile
    from email.parser import Parser

    from packaging.version import Version

    if wheel_dir is not None and wheel_dir.is_dir():
        for f in wheel_dir.glob("*.whl"):
            parts = f.name.split("-")
            if canonical(parts[0]) == w.name and parts[1] == w.version:
                with zipfile.ZipFile(f) as z:
                    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
                    return Parser().parsestr(z.read(meta).decode()).get_all("Requires-Dist") or [], str(f)
    try:
        have = md.version(w.name)
    except md.PackageNotFoundError:
        return None, "none installed"
    if Version(have) != Version(w.version):
        return None, have
    return md.requires(w.name) or [], "installed metadata"


def carried_size(carry: Path) -> int:
    return sum(p.stat().st_size for p in carry.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- commands (pure)


def fetch_commands(wheels: list[Wheel], dest: Path, python: str = sys.executable) -> list[list[str]]:
    """The commands that put every listed wheel into ``dest``: ``pip wheel`` (no build isolation, this
    environment's torch) for deepspeed, whose PyPI release is an sdist; ``pip download`` of the cp312
    manylinux x86_64 wheel for the rest."""
    cmds = []
    for w in wheels:
        if w.name == "deepspeed":
            cmds.append([python, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(dest),
                         f"{w.name}=={w.version}"])
            continue
        cmd = [python, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
               "--implementation", "cp"]
        for plat in PLATFORMS:
            cmd += ["--platform", plat]
        cmds.append(cmd + ["-d", str(dest), f"{w.name}=={w.version}"])
    return cmds


def install_command(wheels: list[Wheel], wheel_dir: str, python: str = "python3") -> list[str]:
    """On the GPU machine: install packlora's pins from the carried wheels only, into the image's
    environment, resolving against what is installed there (pip takes a carried dep/fallback
    wheel only where the installed version does not satisfy a pin's requirement)."""
    return [python, "-m", "pip", "install", "--no-index", "--find-links", wheel_dir, "--no-cache-dir", "--no-compile",
            "--disable-pip-version-check", "-q", *[f"{w.name}=={w.version}" for w in wheels if w.role == "install"]]


def e2e_command(shared: Path, work: Path, python: str = sys.executable) -> list[str]:
    """``packlora launch`` of the bundled tiny config with ``attn_implementation: varlen`` (bf16 on CUDA), into
    a scratch ``output_dir`` that a rerun on the same machine replaces (``--overwrite``)."""
    return [python, "-m", "packlora.cli", "launch", "configs/shishuo_tiny.yaml", "--overwrite", "model.attn_implementation=varlen",
            f"model.tokenizer={shared / 'assets/qwen2-tokenizer'}", f"data.train=[{shared / DATASETS['shishuo']}]",
            f"data.cache_dir={work / 'cache'}", f"output_dir={work / 'e2e'}", "training.max_steps=6",
            "training.save_steps=3", "training.report_to=[]", "data.eval_holdout=4", "decoding.max_new_tokens=16"]


def worker_command(sub: str, *args: str, python: str = sys.executable) -> list[str]:
    return [python, str(Path(__file__).resolve()), sub, *args]


def single_process_env(port: int) -> dict[str, str]:
    """What a launcher sets for one process on one device (DeepSpeed and accelerate read it)."""
    return {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


# --------------------------------------------------------------------------- shared helpers


def _set_attn(model, name: str) -> None:
    """Switch the attention backend of the transformers model inside a PEFT model (or itself)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner.set_attn_implementation(name)


@contextlib.contextmanager
def _reference_varlen(active: bool):
    """CPU dry runs: torch's varlen kernel replaced by packlora's per-segment SDPA reference."""
    if not active:
        yield
        return
    import torch.nn.attention.varlen as torch_varlen

    from packlora.training.varlen_attention import reference_varlen_attn

    original = torch_varlen.varlen_attn
    torch_varlen.varlen_attn = reference_varlen_attn
    try:
        yield
    finally:
        torch_varlen.varlen_attn = original


def model_flops(config: dict, lora_r: int, seg_lens: list[int]) -> float:
    """Model FLOPs of one training step over real segments of lengths ``seg_lens`` (formula and
    sources in the module docstring).

    >>> cfg = dict(hidden_size=4, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
    ...            num_key_value_heads=1, vocab_size=10)
    >>> # N_base = 4*4 + 2*4*2 + 4*4 + 3*4*8 + 10*4 = 184; N_lora = 1*(8 + 6 + 6 + 8 + 12 + 12 + 12) = 64
    >>> model_flops(cfg, 1, [3]) == (4 * 184 + 6 * 64) * 3 + 6 * 1 * 2 * 2 * 9
    True
    """
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    d = config.get("head_dim") or h // heads
    per_layer = h * heads * d + 2 * h * kv * d + heads * d * h + 3 * h * inter
    n_base = layers * per_layer + config["vocab_size"] * h
    lora_per_layer = (h + heads * d) + 2 * (h + kv * d) + (heads * d + h) + 3 * (h + inter)
    n_lora = layers * lora_r * lora_per_layer
    return (4 * n_base + 6 * n_lora) * sum(seg_lens) + 6 * layers * heads * d * sum(n * n for n in seg_lens)


def peak_flops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in device_name), None)


# --------------------------------------------------------------------------- 1. exactness


EXACT_MODEL = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True)
EXACT_ROWS = [[300, 1, 450, 273], [517, 200, 107]]  # row 0 exactly 1,024; row 1 824 (+200 padding unflattened)
EXACT_ROWS_DRY = [[30, 1, 45, 20], [50, 20, 10]]


def exactness(device: str, reference_varlen: bool, seq_lens: list[list[int]], backends: list[str]) -> dict:
    """Packed vs alone in bf16 per backend, with tolerances from the fp32 reference (module docstring)."""
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen2Config

    from packlora.data_utils.collator import PackedCollator
    from packlora.training import packed_attention, varlen_attention  # noqa: F401  (register the backends)

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    g = torch.Generator().manual_seed(1)
    rows = []
    for lens in seq_lens:
        ids = torch.randint(3, EXACT_MODEL["vocab_size"], (sum(lens),), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": ids, "seq_lens": lens})
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(Qwen2Config(**EXACT_MODEL), attn_implementation="sdpa", dtype=torch.float32)
    fp32 = get_peft_model(base, LoraConfig(r=8, target_modules=LORA_MODULES, init_lora_weights=False)).to(device).eval()
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)

    def ce(logits, labels):
        return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                               ignore_index=-100, reduction="sum")

    def grads(model):
        out = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        return out

    def alone(model):
        logits = []
        for row in rows:
            start = 0
            for n in row["seq_lens"]:
                ids = torch.tensor([row["input_ids"][start : start + n]], device=device)
                out = model(input_ids=ids, use_cache=False).logits
                ce(out, ids).backward()
                logits.append(out[0].detach().float())
                start += n
        return logits, grads(model)

    def packed(model, backend, no_isolation=False):
        flat = backend == "varlen"
        collate = PackedCollator(pad_token_id=0, flash_attn_varlen=flat)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate(rows).items()}
        labels = batch.pop("labels")
        if no_isolation:  # the control: one segment over the flattened batch, nothing isolated
            total = sum(sum(r["seq_lens"]) for r in rows)
            batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = torch.tensor([0, total], dtype=torch.int32, device=device)
            batch["max_length_q"] = batch["max_length_k"] = total
        out = model(**batch, use_cache=False).logits
        ce(out, labels).backward()
        per_segment, offset = [], 0
        for b, row in enumerate(rows):
            start = offset if flat else 0
            for n in row["seq_lens"]:
                per_segment.append(out[0 if flat else b, start : start + n].detach().float())
                start += n
            offset += sum(row["seq_lens"])
        return per_segment, grads(model)

    def max_abs(a, b):
        return max((x - y).abs().max().item() for x, y in zip(a, b))

    def max_rel(a, b):
        return max((a[k] - b[k]).abs().max().item() / max(b[k].abs().max().item(), 1e-30) for k in b)

    result = {"device": device, "seq_lens": seq_lens, "model": EXACT_MODEL, "lora_r": 8, "backends": {}}
    with _reference_varlen(reference_varlen):
        ref_logits, ref_grads = alone(fp32)
        for backend in backends:
            started = time.perf_counter()
            try:
                _set_attn(bf16, backend)
                a_logits, a_grads = alone(bf16)
                p_logits, p_grads = packed(bf16, backend)
            except Exception as err:  # noqa: BLE001  (one backend failing must not cost the others' figures)
                import traceback

                traceback.print_exc()
                bf16.zero_grad(set_to_none=True)
                result["backends"][backend] = {"error": repr(err)[:400], "passed": False}
                print(f"exactness {backend}: FAILED {err!r}", flush=True)
                continue
            noise_l, noise_g = max_abs(a_logits, ref_logits), max_rel(a_grads, ref_grads)
            r = {
                "logit_diff": max_abs(p_logits, a_logits), "logit_tol": 2 * noise_l, "logit_noise_bf16": noise_l,
                "logit_diff_vs_fp32": max_abs(p_logits, ref_logits),
                "grad_rel_diff": max_rel(p_grads, a_grads), "grad_rel_tol": 2 * noise_g, "grad_rel_noise_bf16": noise_g,
                "lora_tensors": len(p_grads), "seconds": round(time.perf_counter() - started, 1),
            }
            r["passed"] = r["logit_diff"] <= r["logit_tol"] and r["grad_rel_diff"] <= r["grad_rel_tol"]
            if backend == "varlen":
                leak_logits, _ = packed(bf16, backend, no_isolation=True)
                r["control_leak_logit_diff"] = max_abs(leak_logits, a_logits)
                r["control_exceeds_tol"] = r["control_leak_logit_diff"] > r["logit_tol"]
            result["backends"][backend] = r
            print(f"exactness {backend}: {json.dumps(r)}", flush=True)
    return result


# --------------------------------------------------------------------------- 3. throughput


def throughput(stage: str, shared: Path, work: Path, tiny: bool, reference_varlen: bool, deadline: float,
               warmup: int, timed: int, max_records: int | None, variants: list[str], dtype: str = "bfloat16",
               out: Path | None = None) -> dict:
    """One ZeRO stage, every dataset and variant, one process (module docstring); the results so far
    are written to ``out`` after every variant."""
    from packlora.training import distributed

    distributed.configure()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from torch.utils.data import SequentialSampler

    from packlora.data_utils.collator import PackedCollator
    from packlora.training.config import config_from_dict
    from packlora.training.data import prepare_run_data
    from packlora.training.model import build_model
    from packlora.training.trainer import PackloraTrainer
    from packlora.training.recipe import build_training_arguments

    cuda = torch.cuda.is_available()
    spec = TINY if tiny else QWEN25_05B
    L = 1024 if tiny else 4096  # tiny: zhanghenshui chats reach 769 tokens
    lora_r = 16
    tok_dir = shared / "assets/qwen2-tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    base_dir = work / ("base-tiny" if tiny else "base-qwen2.5-0.5b")
    if not (base_dir / "config.json").is_file():  # built once, seeded, reused by the other stage
        torch.manual_seed(0)
        with torch.device("cuda" if cuda else "cpu"):
            base = AutoModelForCausalLM.from_config(AutoConfig.for_model(**spec), dtype=torch.bfloat16)
        base.save_pretrained(base_dir)
        tokenizer.save_pretrained(base_dir)
        del base
        if cuda:
            torch.cuda.empty_cache()
    files = {}
    for name, rel in DATASETS.items():
        src = shared / rel
        if max_records:
            src = work / f"{name}.{max_records}.jsonl"
            src.write_text("".join((shared / rel).read_text(encoding="utf-8").splitlines(True)[:max_records]), encoding="utf-8")
        files[name] = src

    def run_config(name: str, packing: bool, steps: int = 1):
        return config_from_dict({
            "output_dir": str(work / stage), "seed": 0, "deepspeed": f"{stage}.json",
            "model": {"name_or_path": str(base_dir), "attn_implementation": "sdpa", "dtype": dtype},
            "lora": {"r": lora_r, "alpha": 2 * lora_r, "dropout": 0.0, "target_modules": LORA_MODULES},
            "data": {"train": [str(files[name])], "max_seq_length": L, "packing": packing, "overflow": "drop",
                     "cache_dir": str(work / "cache")},
            "training": {"max_steps": steps, "per_device_train_batch_size": 1, "learning_rate": 1e-4,
                         "logging_steps": 10**6, "save_strategy": "no", "report_to": [], "dataloader_num_workers": 0},
        }, source="gpu_check")

    # The schedule: per dataset and variant, warm-up + timed micro-batches (one optimizer step each).
    schedule, per_dataset, data = [], {}, {}
    g = torch.Generator().manual_seed(0)
    for name in files:
        cfg_packed = run_config(name, True)
        packed = prepare_run_data(cfg_packed, cfg_packed.data.chat_format_for(tokenizer)).rows
        unpacked = prepare_run_data(run_config(name, False), cfg_packed.data.chat_format_for(tokenizer)).rows
        per_row = sum(len(r) for r in packed["seq_lens"]) / len(packed)
        n_pad = max(1, round(per_row))
        per_dataset[name] = {"packed_rows": len(packed), "examples": len(unpacked), "examples_per_row": round(per_row, 2),
                             "padded_batch": n_pad}
        data[name] = (packed, unpacked, n_pad, torch.randperm(len(packed), generator=g).tolist(),
                      torch.randperm(len(unpacked), generator=g).tolist())
    for variant in variants:
        for name, (packed, unpacked, n_pad, rows_order, ex_order) in data.items():
            for k in range(warmup + timed):
                if variant == "padded":
                    idx = [ex_order[(k * n_pad + j) % len(ex_order)] for j in range(n_pad)]
                    items = [unpacked[i] for i in idx]
                else:
                    items = [packed[rows_order[k % len(rows_order)]]]
                schedule.append({"index": len(schedule), "dataset": name, "variant": variant, "timed": k >= warmup,
                                 "rows": [{"input_ids": r["input_ids"], "labels": r["labels"], "seq_lens": r["seq_lens"]}
                                          for r in items]})

    collators = {
        "varlen": PackedCollator(pad_token_id=tokenizer.pad_token_id, flash_attn_varlen=True),
        "flex_attention": PackedCollator(pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=L),
    }
    plain = PackedCollator(pad_token_id=tokenizer.pad_token_id)
    stats: dict[int, dict] = {}

    def collate(batch):
        (item,) = batch
        out = collators.get(VARIANT_ATTN.get(item["variant"], item["variant"]), plain)(item["rows"])
        seg_lens = [n for r in item["rows"] for n in r["seq_lens"]]
        stats[item["index"]] = {"supervised": int((out["labels"][..., 1:] != -100).sum()), "real": sum(seg_lens),
                                "slots": out["labels"].numel(), "seg_lens": seg_lens}
        return out

    cfg = run_config("shishuo", True, steps=len(schedule))  # data: the schedule, not this file
    args = build_training_arguments(cfg)
    model = build_model(str(base_dir), cfg.model, cfg.lora, cfg.seed)
    device_name = torch.cuda.get_device_name() if cuda else platform.processor() or "cpu"
    peak = peak_flops(device_name)
    marks: dict[tuple, dict] = {}

    def key(item):
        return item["dataset"], item["variant"]

    def summary() -> dict:
        results = []
        for name, variant in [(d, v) for d in files for v in variants]:
            m = marks.get((name, variant), {})
            row = {"dataset": name, "variant": variant, "attn_implementation": VARIANT_ATTN.get(variant, variant),
                   "lm_head_positions": "all" if variant in FULL_LOGITS else "supervised"}
            if "t1" not in m or "t0" not in m:
                row["skipped"] = "time budget" if time.time() > deadline else "did not run"
                results.append(row)
                continue
            s = [stats[i] for i in range(m["first_timed"], m["last_timed"] + 1)]
            seconds = m["t1"] - m["t0"]
            flops = sum(model_flops(spec, lora_r, x["seg_lens"]) for x in s)
            row.update(
                timed_steps=len(s), seconds=round(seconds, 3),
                supervised_tokens_per_s=sum(x["supervised"] for x in s) / seconds,
                real_token_fraction=sum(x["real"] for x in s) / sum(x["slots"] for x in s),
                peak_gib=m["peak_bytes"] / 2**30 if m.get("peak_bytes") is not None else None,
                model_tflops_per_s=flops / seconds / 1e12, mfu=flops / seconds / peak if peak else None,
            )
            results.append(row)
        return {"stage": stage, "device": device_name, "model": spec, "dtype": dtype, "lora_r": lora_r,
                "row_tokens": L, "warmup_steps": warmup, "datasets": per_dataset, "results": results}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            item = schedule[state.global_step]
            if item["index"] == 0 or key(schedule[item["index"] - 1]) != key(item):
                _set_attn(model, VARIANT_ATTN.get(item["variant"], item["variant"]))
                trainer.lm_head_positions = "all" if item["variant"] in FULL_LOGITS else "supervised"
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                marks[key(item)] = {"begin": time.perf_counter()}

        def on_step_end(self, args, state, control, **kw):
            i = state.global_step - 1
            item = schedule[i]
            nxt = schedule[i + 1] if i + 1 < len(schedule) else None
            last = nxt is None or key(nxt) != key(item)
            if not last and not item["timed"] and nxt["timed"]:  # warm-up done: the clock starts
                if cuda:
                    torch.cuda.synchronize()
                marks[key(item)]["t0"] = time.perf_counter()
                marks[key(item)]["first_timed"] = i + 1
            if last:
                if cuda:
                    torch.cuda.synchronize()
                m = marks[key(item)]
                m.update(t1=time.perf_counter(), last_timed=i,
                         peak_bytes=torch.cuda.max_memory_allocated() if cuda else None)
                done = summary()  # written after every variant: a kill loses only the one running
                if out is not None:
                    Path(out).write_text(json.dumps(done, indent=1))
                print(f"throughput {stage} {item['dataset']} {item['variant']}: "
                      f"{json.dumps(next(r for r in done['results'] if (r['dataset'], r['variant']) == key(item)))}",
                      flush=True)
            if time.time() > deadline:
                control.should_training_stop = True

    class ScheduleTrainer(PackloraTrainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    trainer = ScheduleTrainer(model=model, args=args, train_dataset=schedule, data_collator=collate,
                              processing_class=tokenizer, callbacks=[Clock()])
    with _reference_varlen(reference_varlen):
        trainer.train()
    return summary()


# --------------------------------------------------------------------------- orchestration


def environment() -> dict:
    import torch

    def version(name):
        try:
            import importlib.metadata as md

            return md.version(name)
        except Exception:  # noqa: BLE001  (absent is an answer too)
            return None

    from packlora.training.varlen_attention import unavailable_reason

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(), "host_cpus": os.cpu_count(),
        "torch": torch.__version__, "cuda": torch.version.cuda,
        **{name: version(name) for name in ("transformers", "deepspeed", "peft", "accelerate", "datasets", "triton")},
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (dry run)",
        "device_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if torch.cuda.is_available() else None,
        "varlen_unavailable": unavailable_reason(torch.cuda.is_available()),
    }
    try:
        import inspect

        from torch.nn.attention.varlen import varlen_attn

        info["varlen_signature"] = str(inspect.signature(varlen_attn))
    except ImportError as err:
        info["varlen_signature"] = f"(none: {err})"
    return info


def matmul_ceiling() -> float:
    """Measured bf16 matmul rate, 8192^3, mean of 10 after 3 warm-ups (TFLOP/s)."""
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * 10 / (time.perf_counter() - start) / 1e12


def _run_step(name: str, cmd: list[str], results: Path, timeout: float, env: dict | None = None) -> int | None:
    """Run one sub-process with a time limit; its output goes to ``results/NAME.log``. None: not run."""
    if timeout < 20:
        (results / f"{name}.log").write_text(f"not run: {timeout:.0f} s left of the budget\n")
        return None
    print(f"[gpu_check] {name} (at most {timeout:.0f} s): {shlex.join(cmd)}", flush=True)
    started = time.monotonic()
    with open(results / f"{name}.log", "w") as log:
        try:
            proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=timeout,
                                  env={**os.environ, **(env or {})})
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            log.write(f"\n[gpu_check] killed after {timeout:.0f} s\n")
            rc = 124
    print(f"[gpu_check] {name}: exit {rc} after {time.monotonic() - started:.0f} s", flush=True)
    return rc


def run(ns) -> int:
    """Everything, in priority order, inside ``--budget-s``; then the report (module docstring)."""
    from packlora.launcher.ports import choose_port

    started = time.monotonic()
    budget = ns.budget_s
    results, work = Path(ns.results), Path(ns.work)
    results.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    shared = Path(ns.shared)
    dry = ns.dry_run
    left = lambda: budget - (time.monotonic() - started)  # noqa: E731
    env = environment()
    if not dry:
        try:
            env["matmul_bf16_tflops"] = round(matmul_ceiling(), 1)
        except Exception as err:  # noqa: BLE001  (the report says so; the checks go on)
            env["matmul_error"] = repr(err)
    (results / "environment.json").write_text(json.dumps(env, indent=1))
    print(f"[gpu_check] environment: {json.dumps(env)}", flush=True)
    if dry:
        problems, _ = check_wheels()
    else:  # what is really installed here now
        problems = unsatisfied_requirements([w.name for w in read_wheels() if w.role == "install"] + ["accelerate"])
        env["unsatisfied_requirements"] = problems
    if problems:
        print("[gpu_check] requirement problems (the run goes on):\n  " + "\n  ".join(problems), flush=True)

    common = ["--shared", str(shared), "--work", str(work)]
    exact = ["exactness", "--device", "cpu" if dry else "cuda", "--out", str(results / "exactness.json")]
    exact += ["--reference-varlen", "--dry-run"] if dry else []
    codes = {"exactness": _run_step("exactness", worker_command(*exact), results, min(110, left() - 30))}
    if dry:
        print(f"[gpu_check] e2e (GPU only; not run in a dry run): {shlex.join(e2e_command(shared, work))}", flush=True)
    else:
        codes["e2e"] = _run_step("e2e", e2e_command(shared, work), results, min(110, left() - 150),
                                 env={"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"})
    stages = ("zero2", "zero3")
    for i, stage in enumerate(stages):
        share = left() / (len(stages) - i) - 5
        cmd = worker_command("throughput", "--stage", stage, "--out", str(results / f"throughput_{stage}.json"),
                             "--deadline", str(time.time() + share - 25), *common)
        cmd += ["--tiny", "--reference-varlen", "--warmup", "1", "--timed", "1", "--max-records", "60", "--dtype",
                "float32", "--variants", "padded,sdpa,packed_sdpa,varlen,varlen_full_logits"] if dry else []
        codes[f"throughput_{stage}"] = _run_step(f"throughput_{stage}", cmd, results, share,
                                                 env=single_process_env(choose_port()))
    (results / "exit_codes.json").write_text(json.dumps(codes))
    section = report(results, dry)
    target = Path(ns.write)
    if target.name == "RESULTS.md" or target.exists():
        from packing_bench import write_section

        write_section(target, "gpu", section)
    else:
        target.write_text(section + "\n")
    print(section, flush=True)
    print(f"[gpu_check] done in {time.monotonic() - started:.0f} s; section written to {target}", flush=True)
    return 0 if all(c == 0 for c in codes.values() if c is not None) else 1


# --------------------------------------------------------------------------- report


def _fmt(x, spec=".3g", none="—"):
    return none if x is None else format(x, spec)


def report(results: Path, dry: bool) -> str:
    """The ``<!-- gpu -->`` section of RESULTS.md from the JSON files in ``results``."""
    load = lambda name: json.loads((results / name).read_text()) if (results / name).is_file() else None  # noqa: E731
    env = load("environment.json") or {}
    codes = load("exit_codes.json") or {}
    head = "## GPU check: exact packed attention in bf16, throughput and MFU per backend\n\n"
    if dry:
        head += ("**CPU dry run** (`bash benchmarks/gpu_check.sh --dry-run`): tiny model, the varlen kernel replaced "
                 "by its per-segment SDPA reference, throughput in fp32, 1 timed step per variant. These numbers "
                 "only show the code runs; they measure nothing.\n\n")
    head += (f"`bash benchmarks/gpu_check.sh` — {env.get('date', '?')}; {env.get('device', '?')} "
             f"({_fmt(env.get('device_memory_gib'), 'g')} GiB), {env.get('host_cpus', '?')} CPU cores; torch "
             f"{env.get('torch')} (CUDA {env.get('cuda')}), transformers {env.get('transformers')}, deepspeed "
             f"{env.get('deepspeed')}, peft {env.get('peft')}, accelerate {env.get('accelerate')}, datasets "
             f"{env.get('datasets')}, python {env.get('python')}. Measured bf16 matmul (8192^3): "
             f"{_fmt(env.get('matmul_bf16_tflops'), '.0f')} TFLOP/s. Exit codes: {json.dumps(codes)}. Setup, "
             "tolerances and the MFU formula: `benchmarks/gpu_check.py`'s docstring.\n")
    if env.get("varlen_signature"):
        head += f"\nThe installed kernel: `varlen_attn{env['varlen_signature']}`\n"
    out = [head]
    ex = load("exactness.json")
    out.append("### Packed == unpacked in bf16 (logits: max abs; LoRA gradients: max relative)\n")
    if ex is None:
        out.append("Not measured (see exactness.log).\n")
    else:
        out.append(f"Segments {ex['seq_lens']}; tolerance = 2 x (bf16 alone vs fp32 alone).\n")
        out.append("| backend | logits: packed vs alone | tolerance | vs fp32 | LoRA grads: packed vs alone | tolerance | "
                   "LoRA tensors | within tolerance |")
        out.append("|---|---|---|---|---|---|---|---|")
        for b, r in ex["backends"].items():
            if "error" in r:
                out.append(f"| {b} | error: {r['error']} | | | | | | **NO** |")
                continue
            out.append(f"| {b} | {r['logit_diff']:.3g} | {r['logit_tol']:.3g} | {r['logit_diff_vs_fp32']:.3g} | "
                       f"{r['grad_rel_diff']:.3g} | {r['grad_rel_tol']:.3g} | {r['lora_tensors']} | "
                       f"{'yes' if r['passed'] else '**NO**'} |")
        v = ex["backends"].get("varlen", {})
        if "control_leak_logit_diff" in v:
            out.append(f"\nControl, varlen with one segment spanning the whole flattened batch (no isolation): logits differ by "
                       f"{v['control_leak_logit_diff']:.3g} ({'above' if v['control_exceeds_tol'] else '**not above**'} "
                       f"the tolerance {v['logit_tol']:.3g}), so the check can fail.\n")
    e2e = (results / "e2e.log").read_text(errors="replace") if (results / "e2e.log").is_file() else None
    if not dry:
        ok = codes.get("e2e") == 0
        out.append(f"### packlora launch end to end (varlen, bf16, ZeRO-3, 1 GPU)\n\n"
                   f"{'Trained 6 steps, saved 2 checkpoints, decoded 4 held-out prompts on CUDA.' if ok else 'FAILED or not run'}"
                   f" (exit {codes.get('e2e')}; e2e.log){'' if ok or e2e is None else ': ' + e2e[-600:].replace(chr(10), ' ')}\n")
    for stage in ("zero2", "zero3"):
        tp = load(f"throughput_{stage}.json")
        out.append(f"### Throughput, DeepSpeed {stage.upper().replace('ZERO', 'ZeRO-')}, one process\n")
        if tp is None:
            out.append(f"Not measured (see throughput_{stage}.log).\n")
            continue
        m = tp["model"]
        out.append(f"Model: {m['num_hidden_layers']} layers, hidden {m['hidden_size']}, {m['num_attention_heads']}/"
                   f"{m['num_key_value_heads']} heads, vocabulary {m['vocab_size']}, {tp.get('dtype', 'bfloat16')}; LoRA r {tp['lora_r']} on all 7 "
                   f"projections; rows of {tp['row_tokens']} tokens; {tp['warmup_steps']} warm-up steps. Data: "
                   + "; ".join(f"{k}: {v['examples']} examples in {v['packed_rows']} rows ({v['examples_per_row']}/row, "
                               f"padded baseline {v['padded_batch']}/step)" for k, v in tp["datasets"].items()) + "\n")
        out.append("| data | variant | supervised tokens/s | x padded | x sdpa | real-token fraction | peak GiB | "
                   "model TFLOP/s | MFU | timed steps |")
        out.append("|---|---|---|---|---|---|---|---|---|---|")
        by = {(r["dataset"], r["variant"]): r for r in tp["results"]}
        for r in tp["results"]:
            if "skipped" in r:
                out.append(f"| {r['dataset']} | {r['variant']} | not measured ({r['skipped']}) | | | | | | | |")
                continue
            pad = by.get((r["dataset"], "padded"), {}).get("supervised_tokens_per_s")
            sdpa = by.get((r["dataset"], "sdpa"), {}).get("supervised_tokens_per_s")
            t = r["supervised_tokens_per_s"]
            out.append(f"| {r['dataset']} | {r['variant']} | {t:,.0f} | {_fmt(pad and t / pad, '.2f')} | "
                       f"{_fmt(sdpa and t / sdpa, '.2f')} | {r['real_token_fraction']:.1%} | {_fmt(r['peak_gib'], '.1f')} | "
                       f"{r['model_tflops_per_s']:.3g} | {_fmt(r['mfu'] and 100 * r['mfu'], '.1f')}{'%' if r['mfu'] else ''} | "
                       f"{r['timed_steps']} |")
        head_rows = []
        for name in tp["datasets"]:
            new, old = by.get((name, "varlen"), {}), by.get((name, "varlen_full_logits"), {})
            if "supervised_tokens_per_s" in new and "supervised_tokens_per_s" in old:
                mem = new["peak_gib"] / old["peak_gib"] if new.get("peak_gib") and old.get("peak_gib") else None
                head_rows.append(f"{name}: {new['supervised_tokens_per_s'] / old['supervised_tokens_per_s']:.2f}x the "
                                 f"supervised tokens/s, {_fmt(mem, '.2f')}x the peak memory")
        if head_rows:
            out.append("\nLM head at the supervised positions (`varlen`) vs full logits (`varlen_full_logits`), one "
                       "run each: " + "; ".join(head_rows) + ". Goal (issue 21): peak memory at most 0.5x.")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


# --------------------------------------------------------------------------- CLI


def fetch(dest: Path, shared: Path) -> int:
    """Download/build the wheels into ``dest/wheels`` and copy the assets into ``dest/shared``."""
    wheels = read_wheels()
    wheel_dir = dest / "wheels"
    if wheel_dir.exists():
        shutil.rmtree(wheel_dir)
    wheel_dir.mkdir(parents=True)
    for cmd in fetch_commands(wheels, wheel_dir):
        print("+", shlex.join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    for rel in ASSETS:
        target = dest / "shared" / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shared / rel, target)
    problems, notes = check_wheels(wheel_dir)
    size = carried_size(dest)
    print(f"{dest}: {size / 2**20:.1f} MiB ({sum(1 for _ in wheel_dir.iterdir())} wheels + assets)")
    if size > CARRY_LIMIT_BYTES:
        problems.append(f"{dest} holds {size / 2**20:.1f} MiB, over {CARRY_LIMIT_BYTES / 2**20:.0f} MiB")
    for p in problems:
        print("PROBLEM:", p)
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    default_shared = REPO.parent / "shared" if (REPO.parent / "shared").is_dir() else REPO / CARRY_DIR / "shared"
    c = sub.add_parser("check-wheels", help="gpu_wheels.txt vs constraints.txt, requirements and the GPU image")
    c.add_argument("--wheel-dir", type=Path, default=REPO / CARRY_DIR / "wheels")
    c.add_argument("--print-commands", action="store_true", help="also print the fetch and install commands")
    i = sub.add_parser("install-command", help="print the command that installs the carried wheels on the GPU machine")
    i.add_argument("--python", default="python3")
    i.add_argument("--wheel-dir", default=f"{CARRY_DIR}/wheels")
    f = sub.add_parser("fetch", help="download/build the wheels and copy the assets (needs pip's registry)")
    f.add_argument("--dest", type=Path, default=REPO / CARRY_DIR)
    f.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    r = sub.add_parser("run", help="exactness, end to end, throughput; then the report")
    r.add_argument("--dry-run", action="store_true", help="CPU: tiny model, reference varlen kernel, a step per variant")
    r.add_argument("--budget-s", type=float, default=400)
    r.add_argument("--shared", default=str(default_shared))
    r.add_argument("--work", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "packlora-gpu-check"))
    r.add_argument("--results", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "packlora-gpu-check", "results"))
    r.add_argument("--write", default=str(BENCH / "RESULTS.md"), help="RESULTS.md to update (or a new file)")
    e = sub.add_parser("exactness")
    e.add_argument("--device", default="cuda")
    e.add_argument("--out", required=True)
    e.add_argument("--reference-varlen", action="store_true")
    e.add_argument("--dry-run", action="store_true", help="short segments (CPU)")
    e.add_argument("--backends", default=None, help="comma-separated (default: all that train on the device)")
    t = sub.add_parser("throughput")
    t.add_argument("--stage", choices=["zero2", "zero3"], required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--shared", type=Path, default=default_shared)
    t.add_argument("--work", type=Path, required=True)
    t.add_argument("--tiny", action="store_true")
    t.add_argument("--reference-varlen", action="store_true")
    t.add_argument("--deadline", type=float, default=float("inf"), help="epoch seconds: stop starting steps after it")
    t.add_argument("--warmup", type=int, default=2)
    t.add_argument("--timed", type=int, default=6)
    t.add_argument("--max-records", type=int, default=None)
    t.add_argument("--variants", default=",".join(VARIANTS))
    t.add_argument("--dtype", default="bfloat16", help="float32 in CPU dry runs (bf16 matmuls are slow on CPUs)")
    ns = ap.parse_args(argv)

    if ns.cmd == "check-wheels":
        problems, notes = check_wheels(ns.wheel_dir)
        wheels = read_wheels()
        print(f"gpu_wheels.txt: {len(wheels)} wheels ({', '.join(f'{w.name}=={w.version}' for w in wheels)})")
        for n in notes:
            print("relies on the GPU image:", n)
        if ns.print_commands:
            for cmd in fetch_commands(wheels, REPO / CARRY_DIR / "wheels"):
                print("fetch:  ", shlex.join(cmd))
            print("install:", shlex.join(install_command(wheels, f"{CARRY_DIR}/wheels")))
        for p in problems:
            print("PROBLEM:", p)
        print("wheel list OK" if not problems else f"{len(problems)} problem(s)")
        return 1 if problems else 0
    if ns.cmd == "install-command":
        print(shlex.join(install_command(read_wheels(), ns.wheel_dir, ns.python)))
        return 0
    if ns.cmd == "fetch":
        return fetch(ns.dest, ns.shared)
    if ns.cmd == "run":
        return run(ns)
    if ns.cmd == "exactness":
        import torch

        cuda = ns.device.startswith("cuda")
        backends = ns.backends.split(",") if ns.backends else [b for b in EXACT_BACKENDS if cuda or b != "flex_attention"]
        result = exactness(ns.device, ns.reference_varlen, EXACT_ROWS_DRY if ns.dry_run else EXACT_ROWS, backends)
        result["torch"] = torch.__version__
        Path(ns.out).write_text(json.dumps(result, indent=1))
        return 0 if all(r["passed"] for r in result["backends"].values()) and \
            result["backends"].get("varlen", {}).get("control_exceeds_tol", True) else 1
    if ns.cmd == "throughput":
        result = throughput(ns.stage, ns.shared, ns.work, ns.tiny, ns.reference_varlen, ns.deadline, ns.warmup,
                            ns.timed, ns.max_records, ns.variants.split(","), ns.dtype, Path(ns.out))
        if int(os.environ.get("RANK", 0)) == 0:
            Path(ns.out).write_text(json.dumps(result, indent=1))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
