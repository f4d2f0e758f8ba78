"""Style presets: bundled files match the real data, never override a record's system message unless
asked, reach the tokenised training rows and the config; stage 1 text: stage check, EOS placement."""
import json

import pytest

from packlora.presets import PresetError, apply_preset, available_presets, load_preset
from tiny_assets import REPO_ROOT, SHARED, prepare
from packlora.training.config import ConfigError, config_from_dict

REWRITE_GUARD = "你的回复必须在完成改写后立即结束，不得继续生成任何对话、提示或新任务。"
CONTINUE_GUARD = "你的回复必须在完成续写后立即结束，不得继续生成任何对话、提示或新任务。"
ZHANG_SYSTEM = "你是一个文学创作助手，擅长张恨水的章回小说文风。"


def _first_system(path):
    with open(path, encoding="utf-8") as f:
        return json.loads(f.readline())["messages"][0]["content"]


def test_bundled_presets_use_the_real_data_system_prompts_and_a_guard_worded_for_their_task():
    assert available_presets() == ["none", "shishuo", "zhang_henshui"]
    zh, ss = load_preset("zhang_henshui"), load_preset("shishuo")
    assert zh.system_prompt == _first_system(SHARED / "data/zhanghenshui/stage2_continue.jsonl")
    assert zh.system_prompt == ZHANG_SYSTEM
    assert ss.system_prompt == _first_system(SHARED / "data/shishuo/stage2_rewrite.jsonl")
    assert zh.guard == CONTINUE_GUARD  # the corpus is 续写 (continuation) chats
    assert ss.guard == REWRITE_GUARD  # the corpus is 改写 (rewrite) chats
    assert ss.system_message() == "你是一个文学创作助手，擅长《世说新语》的文言笔法。" + REWRITE_GUARD
    assert zh.stop_tokens == ss.stop_tokens == ("<|im_end|>", "<|endoftext|>")
    assert load_preset("none").system_message() == ""


def test_preset_fills_a_missing_system_message_and_keeps_a_foreign_one_unless_override():
    p = load_preset("shishuo")
    user = {"role": "user", "content": "改写"}
    own = {"role": "system", "content": "mine"}
    guarded = {"role": "system", "content": "你是一个文学创作助手，擅长《世说新语》的文言笔法。" + REWRITE_GUARD}
    assert apply_preset([user], p) == ([guarded, user], "added")
    assert apply_preset([own, user], p) == ([own, user], "kept_own")
    assert apply_preset([own, user], p, override=True) == ([guarded, user], "replaced")


def test_preset_appends_its_guard_to_its_own_system_prompt_once():
    p = load_preset("shishuo")
    user = {"role": "user", "content": "改写"}
    own = {"role": "system", "content": "你是一个文学创作助手，擅长《世说新语》的文言笔法。"}
    guarded = {"role": "system", "content": "你是一个文学创作助手，擅长《世说新语》的文言笔法。" + REWRITE_GUARD}
    assert apply_preset([own, user], p) == ([guarded, user], "guard_appended")
    assert apply_preset([guarded, user], p) == ([guarded, user], "already_guarded")
    assert apply_preset([guarded, user], p, override=True) == ([guarded, user], "already_guarded")


def test_preset_counts_a_listed_system_prompt_as_its_own(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("system_prompt: Be a poet.\nguard: ' Stop after the poem.'\nknown_system_prompts: [Be a bard.]\n"
                 "stop_tokens: ['<|im_end|>']\n")
    p = load_preset(str(f))
    user = {"role": "user", "content": "Rain"}
    assert apply_preset([{"role": "system", "content": "Be a bard."}, user], p) == (
        [{"role": "system", "content": "Be a bard. Stop after the poem."}, user], "guard_appended")
    assert apply_preset([{"role": "system", "content": "Be a sailor."}, user], p)[1] == "kept_own"


def test_zhanghenshui_data_report_counts_every_chat_with_the_guard(qwen2_tokenizer, tmp_path):
    from packlora.training.config import load_config
    from packlora.training.data import load_run_preset, prepare_run_data

    tiny = (REPO_ROOT / "configs/zhanghenshui/tiny_cpu.overrides").read_text().split()
    cfg = load_config(REPO_ROOT / "configs/zhanghenshui/stage2.yaml", [*tiny, "init_from=null", f"data.cache_dir={tmp_path}"])
    data = prepare_run_data(cfg, cfg.data.chat_format_for(qwen2_tokenizer), load_run_preset(cfg.preset))
    assert (data.report.records, data.report.chats_with_guard) == (3146, 3146)
    assert data.report.preset_actions == {"guard_appended": 3146}
    first = qwen2_tokenizer.decode(data.rows[0]["input_ids"])
    assert first.count(ZHANG_SYSTEM + CONTINUE_GUARD) == len(data.rows[0]["seq_lens"])  # every segment
    assert all(m["content"] == ZHANG_SYSTEM + CONTINUE_GUARD for r in data.heldout for m in r.as_dicts()[:1])


def test_unknown_or_malformed_preset_is_a_clear_error(tmp_path):
    with pytest.raises(PresetError, match=r"'shishou' is neither a bundled preset \['none', 'shishuo', 'zhang_henshui'\]"):
        load_preset("shishou")
    bad = tmp_path / "bad.yaml"
    bad.write_text("system_prompt: hi\nguard: 3\nstop_tokens: []\ncolour: red\n")
    with pytest.raises(PresetError) as e:
        load_preset(str(bad))
    assert "unknown key 'colour'" in str(e.value) and "guard must be a string" in str(e.value)
    assert "stop_tokens must be a non-empty list" in str(e.value)


def test_preset_reaches_training_rows_only_for_chats_without_a_system_message(chatml_tokenizer, tmp_path):
    f = tmp_path / "chats.jsonl"
    f.write_text(
        json.dumps({"messages": [{"role": "user", "content": "Hello Ann"}, {"role": "assistant", "content": "Hi."}]}) + "\n"
        + json.dumps({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello Bo"},
                                   {"role": "assistant", "content": "Yes."}]}) + "\n"
    )
    preset = load_preset("shishuo")
    data = prepare([str(f)], chatml_tokenizer, max_seq_length=512, cache_dir=tmp_path / "c", preset=preset)
    text = "".join(chatml_tokenizer.decode(row["input_ids"]) for row in data.rows)
    assert text.count(preset.system_message()) == 1  # Ann's chat got it, Bo's kept "Be brief."
    assert "Be brief." in text and "You are a helpful assistant" not in text
    over = prepare([str(f)], chatml_tokenizer, max_seq_length=512, cache_dir=tmp_path / "c",
                        preset=preset, preset_overrides_system=True)
    text = "".join(chatml_tokenizer.decode(row["input_ids"]) for row in over.rows)
    assert text.count(preset.system_message()) == 2 and "Be brief." not in text


def test_config_names_bad_preset_init_from_and_init_mode(run_config, tmp_path):
    from packlora.training.preflight import check_run

    raw = run_config.dict(preset="shishou", init_from=str(tmp_path / "nowhere"), init_mode="fuse")
    raw["data"]["stage"] = "cpt"
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw)
    problems = "\n".join(e.value.problems)
    assert "init_mode: 'fuse' is not one of ['merge', 'continue']" in problems
    assert "data.stage: 'cpt' is not one of ['auto', 'pretrain', 'sft']" in problems
    cfg = config_from_dict(run_config.dict(preset="shishou", init_from=str(tmp_path / "nowhere")))
    problems = "\n".join(check_run(cfg, training_arguments=False))  # what the machine lacks: a separate step
    assert "preset: preset 'shishou' is neither a bundled preset" in problems
    assert "init_from: " in problems and "is not a checkpoint directory" in problems


def test_config_records_preset_and_init_from(run_config, tmp_path):
    ckpt = tmp_path / "stage1"
    ckpt.mkdir()
    (ckpt / "adapter_config.json").write_text("{}")
    cfg = config_from_dict(run_config.dict(preset="zhang_henshui", init_from=str(ckpt), init_mode="continue"))
    d = cfg.to_dict()
    assert (d["preset"], d["preset_overrides_system"], d["init_from"], d["init_mode"]) == (
        "zhang_henshui", False, str(ckpt), "continue")


def test_presets_load_by_name_outside_the_source_tree(tmp_path):
    # package_data: the YAML files travel with the installed `packlora.presets` package
    import subprocess
    import sys

    code = "from packlora import presets; print(presets.load_preset('zhang_henshui').system_prompt)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "你是一个文学创作助手，擅长张恨水的章回小说文风。"


def test_message_tuples_get_the_preset_without_becoming_dicts():
    """What ``split_stage`` does: the records' ``Message`` tuples (reasoning included) go through the
    preset as they are."""
    from packlora.data_utils.types import Message
    from packlora.presets import preset_edit, splice_system

    p = load_preset("shishuo")
    chat = (Message("user", "hi"), Message("assistant", "ok", "think first"))
    action, system = preset_edit(("user", "hi"), p)
    assert action == "added"
    assert splice_system(chat, action, Message("system", system)) == [
        Message("system", p.system_prompt + p.guard), Message("user", "hi"), Message("assistant", "ok", "think first")]
    own = (Message("system", p.system_prompt), *chat)
    action, system = preset_edit(("system", p.system_prompt), p)
    assert splice_system(own, action, Message("system", system)) == [Message("system", p.system_prompt + p.guard), *chat]
    assert preset_edit(("system", "mine"), p) == ("kept_own", None)
