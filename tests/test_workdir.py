"""lolcats.workdir: the resume identity of a run, what a changed setting redoes, kept measurements."""
from __future__ import annotations

import pytest

from lolcats.errors import LinearizeError
from lolcats.workdir import PARTIAL_NAME, RUN_NAME, WorkDir, work_dir_for

IDENTITY = {"lolcats": {"w": 8}, "stage1": {"lr": 0.01}, "stage2": {"lr": 0.001}, "lora": {"r": 8},
            "loss": {"mse_weight": 1000.0}, "data": "abc", "sample": ["hi", 4]}


def started(out, identity=IDENTITY, resume=False, overwrite=False, fp="base"):
    w = WorkDir(out, resume=resume, overwrite=overwrite)
    w.check_identity(identity, fp, "src")
    w.begin()
    return w


def test_fresh_run_then_resume_keeps_measurements(tmp_path):
    out = tmp_path / "out"
    w = started(out)
    assert w.path == work_dir_for(out) and (w / RUN_NAME).is_file()
    assert w.measured("ppl_teacher", lambda: {"ppl": 3.0}) == {"ppl": 3.0}
    assert (w / PARTIAL_NAME).is_file() and w.resume_message() is None
    with pytest.raises(LinearizeError, match="unfinished run"):
        WorkDir(out, resume=False, overwrite=False)
    again = started(out, resume=True)
    assert again.runs == 2 and again.measured("ppl_teacher", lambda: pytest.fail("measured twice")) == {"ppl": 3.0}
    assert again.resume_message().startswith("--resume: continuing the run") and not again.redo


def test_what_a_changed_setting_redoes(tmp_path):
    out = tmp_path / "out"
    w = started(out)
    w.measured("ppl_stage2", lambda: {"ppl": 2.0})
    w.measured("sample", lambda: {"text": "x"})
    later = started(out, {**IDENTITY, "sample": ["other", 4]}, resume=True)
    assert later.redo == {"sample"} and "sample" not in later.partial and "ppl_stage2" in later.partial
    stage2 = started(out, {**IDENTITY, "lora": {"r": 4}}, resume=True)
    assert stage2.redo == {"stage2", "sample"} and "ppl_stage2" not in stage2.partial
    assert stage2.meta("stage1") == w.meta("stage1") and stage2.meta("stage2") != w.meta("stage2")
    with pytest.raises(LinearizeError, match=r"other options or data \(differs in: stage1\)"):
        started(out, {**IDENTITY, "lora": {"r": 4}, "stage1": {"lr": 0.02}}, resume=True)  # vs the last run.json
    with pytest.raises(LinearizeError, match="another base model"):
        started(out, resume=True, fp="other")


def test_a_changed_softmax_selection_redoes_it_and_stage2(tmp_path):
    out = tmp_path / "out"
    keep = {**IDENTITY, "keep_softmax": {"layers": 1, "blocks": 4}}
    w = started(out, keep)
    for key in ("softmax_selection", "ppl_softmax_kept", "ppl_stage2"):
        w.measured(key, lambda: {"x": 1})
    same_choice = started(out, {**keep, "lora": {"r": 4}}, resume=True)  # stage 2 again, the same layers
    assert same_choice.redo == {"stage2", "sample"} and "softmax_selection" in same_choice.partial
    assert "ppl_softmax_kept" in same_choice.partial and "ppl_stage2" not in same_choice.partial
    other = started(out, {**keep, "lora": {"r": 4}, "keep_softmax": {"layers": 2, "blocks": 4}}, resume=True)
    assert other.redo == {"select", "stage2", "sample"}
    assert not {"softmax_selection", "ppl_softmax_kept"} & set(other.partial)
    assert other.meta("stage1") == w.meta("stage1") and other.meta("stage2") != same_choice.meta("stage2")
