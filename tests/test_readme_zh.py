"""README_zh.md cannot drift from README.md: its commands are README.md's commands.

README.md is the source of truth. Every ``packlora ...`` command in README_zh.md, from a fenced code
block (``$`` prompts dropped, ``\\`` continuations joined, trailing comments removed) or from inline
code (which may wrap over lines), must be one of README.md's commands, found the same way, with
whitespace runs collapsed to one space on both sides. Every other line of README_zh.md's code blocks
(dry-run output, ``bash scripts/demo.sh``, ``#SBATCH`` lines) must be a line of README.md's code blocks;
only a comment written in Chinese may differ, since it is a translation.
"""
from __future__ import annotations

import difflib
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
README_ZH = REPO / "README_zh.md"
SECTIONS_ZH = ("快速开始", "两阶段风格训练", "在集群上运行")  # quick start, two-stage workflow, cluster

_FENCE = re.compile(r"^\s*```")
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_INLINE_CODE = re.compile(r"(`+)(.+?)\1", re.DOTALL)
_CJK = re.compile(r"[\u3000-\u303f\u4e00-\u9fff\uff00-\uffef]")


def _split_fences(markdown: str) -> tuple[list[list[str]], str]:
    """``(fenced blocks as lists of lines, the prose with every block replaced by a blank line)``."""
    blocks, prose, current = [], [], None
    for line in markdown.splitlines():
        if _FENCE.match(line):
            if current is None:
                current = []
            else:
                blocks.append(current)
                current = None
            prose.append("")
        elif current is not None:
            current.append(line)
        else:
            prose.append(line)
    return blocks, "\n".join(prose)


def _logical_lines(block: list[str]) -> list[str]:
    """The block's lines with shell continuations (a trailing ``\\``) joined to the next line."""
    out, pending = [], ""
    for line in block:
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
        else:
            out.append(pending + line)
            pending = ""
    if pending:
        out.append(pending)
    return out


def _strip_comment(line: str) -> str:
    """``line`` without its shell comment: a ``#`` that starts a word outside quotes, and what follows."""
    quote, escaped = None, False
    for i, char in enumerate(line):
        if escaped:
            escaped = False
        elif char == "\\" and quote != "'":
            escaped = True
        elif quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def _norm(text: str) -> str:
    return " ".join(text.split())


def _drop_prompt(line: str) -> str:
    stripped = line.lstrip()
    return stripped[2:] if stripped.startswith("$ ") else line


def _is_packlora_command(text: str) -> bool:
    """True for ``packlora SUBCOMMAND ...``, after any ``VAR=value`` prefixes (not ``packlora.place:``)."""
    words = text.split()
    while words and _ASSIGNMENT.match(words[0]):
        words = words[1:]
    return len(words) >= 2 and words[0] == "packlora"


def packlora_commands(markdown: str) -> set[str]:
    """Every ``packlora ...`` command of a Markdown text, whitespace-normalised, comments removed.

    >>> print(*sorted(packlora_commands('''
    ... Run `packlora launch CONFIG
    ...   --dry-run` first; each rank logs `packlora.place: rank 0`, then `X=1 packlora decode CKPT`.
    ...
    ... ```bash
    ... $ packlora subset --input a.jsonl \\\\
    ...     --ratio 0.2   # 20%
    ... packlora decode CKPT --stop-string '# not a comment'
    ... OMP_NUM_THREADS=1 deepspeed --module packlora.train x.yaml
    ... ```
    ... ''')), sep="\\n")
    X=1 packlora decode CKPT
    packlora decode CKPT --stop-string '# not a comment'
    packlora launch CONFIG --dry-run
    packlora subset --input a.jsonl --ratio 0.2
    """
    blocks, prose = _split_fences(markdown)
    found = set()
    for block in blocks:
        for line in _logical_lines(block):
            command = _norm(_strip_comment(_drop_prompt(line)))
            if _is_packlora_command(command):
                found.add(command)
    for paragraph in re.split(r"\n\s*\n", prose):
        for match in _INLINE_CODE.finditer(paragraph):
            code = _norm(match.group(2).replace("\\|", "|"))  # `\|` is a pipe escaped for a table cell
            if _is_packlora_command(code):
                found.add(code)
    return found


def _block_lines(markdown: str, *, translated_comments: bool) -> set[str]:
    """Normalised non-blank lines of every fenced block (``$`` prompts dropped, continuations joined).

    With ``translated_comments``, a comment holding Chinese text is a translation and is removed;
    otherwise each line is kept both whole and without its comment.
    """
    blocks, _ = _split_fences(markdown)
    out = set()
    for block in blocks:
        for line in _logical_lines(block):
            line = _drop_prompt(line)
            without_comment = _strip_comment(line)
            if translated_comments:
                kept = [without_comment if _CJK.search(line[len(without_comment):]) else line]
            else:
                kept = [line, without_comment]
            out |= {_norm(k) for k in kept if k.strip()}
    return out


def _missing_report(missing: set[str], available: set[str]) -> str:
    lines = []
    for item in sorted(missing):
        near = difflib.get_close_matches(item, sorted(available), n=1, cutoff=0.5)
        lines.append(f"  README_zh.md: {item}\n  README.md:    {near[0] if near else '(nothing close)'}")
    return "\n".join(lines)


def _sections(markdown: str) -> dict[str, str]:
    """``{level-2 heading: its text up to the next level-2 heading}``, code blocks included."""
    parts = re.split(r"^## +(.+?)\s*$", markdown, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2]))


def _github_anchors(markdown: str) -> set[str]:
    """Anchors GitHub makes of the headings (lower case, punctuation dropped, spaces to ``-``)."""
    _, prose = _split_fences(markdown)
    anchors = set(re.findall(r'<a id="([^"]+)"', prose))
    for heading in re.findall(r"^#{1,6} +(.+?)\s*$", prose, flags=re.MULTILINE):
        anchors.add(re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-"))
    return anchors


def test_every_packlora_command_in_readme_zh_is_a_command_of_readme():
    zh = packlora_commands(README_ZH.read_text(encoding="utf-8"))
    en = packlora_commands(README.read_text(encoding="utf-8"))
    missing = zh - en
    assert not missing, (
        f"{len(missing)} packlora command(s) of README_zh.md are not in README.md; copy them from "
        f"README.md (the source of truth):\n{_missing_report(missing, en)}"
    )


def test_every_line_of_readme_zh_code_blocks_is_copied_from_readme():
    zh = _block_lines(README_ZH.read_text(encoding="utf-8"), translated_comments=True)
    en = _block_lines(README.read_text(encoding="utf-8"), translated_comments=False)
    missing = zh - en
    assert not missing, (
        f"{len(missing)} code-block line(s) of README_zh.md are not in README.md's code blocks; copy "
        f"them from README.md (only a comment in Chinese may differ):\n{_missing_report(missing, en)}"
    )


def test_readme_links_readme_zh_before_its_first_section():
    readme = README.read_text(encoding="utf-8")
    top = readme.split("\n## ", 1)[0]
    assert "](README_zh.md)" in top, "README.md must link README_zh.md above its first '## ' section"
    assert "](README.md)" in README_ZH.read_text(encoding="utf-8")


def test_readme_zh_has_quick_start_two_stage_and_cluster_sections_each_with_its_commands():
    sections = _sections(README_ZH.read_text(encoding="utf-8"))
    assert [s for s in SECTIONS_ZH if s in sections] == list(SECTIONS_ZH), sorted(sections)
    subcommands = {
        name: {command.split()[1] for command in packlora_commands(sections[name])} for name in SECTIONS_ZH
    }
    assert {"inspect", "launch", "decode"} <= subcommands["快速开始"]
    assert {"launch", "subset", "decode", "export", "eval-runaway"} <= subcommands["两阶段风格训练"]
    assert {"launch", "slurm"} <= subcommands["在集群上运行"]


def test_readme_zh_links_only_to_headings_that_exist_in_readme():
    links = re.findall(r"\]\(README\.md#([^)]+)\)", README_ZH.read_text(encoding="utf-8"))
    assert links, "README_zh.md should point at README.md's sections for what it leaves out"
    anchors = _github_anchors(README.read_text(encoding="utf-8"))
    assert sorted(set(links) - anchors) == []
