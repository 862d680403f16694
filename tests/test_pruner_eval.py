"""The persona-pruner-eval format: description-only personas with their own questions and rubric."""

from __future__ import annotations

import json
import os

import pytest

from persona_core.catalog import CatalogError, load_catalog
from persona_core.eval.config import EvalConfig
from persona_core.eval.judge import judge_prompt
from persona_core.learn.config import DataConfig
from persona_core.learn.data import training_instructions
from persona_core.eval.metrics import heldout_questions

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "persona-pruner-eval")
RUBRIC = "Judge whether this answer fits the persona: {desc}\n[Q] {{question}} [A] {{answer}}\nReply 0-100."


def _write(folder, name, desc, questions, rubric_desc=None):
    rec = {"user_id": "u", "persona_description": desc,
           "system_prompt": f"\nYou are roleplaying as a user with this persona: {desc}\nAnswer the question.",
           "instruction": [{"pos": "x", "neg": ""}], "questions": questions,
           "eval_prompt": RUBRIC.format(desc=rubric_desc or desc)}
    (folder / name).write_text(json.dumps(rec))


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "ppe"
    d.mkdir()
    _write(d, "rolebench_specific_user_0.json", "A grumpy wizard.", ["What is your wand made of?", "Why so grumpy?"])
    _write(d, "rolebench_general_user_0.json", "A grumpy wizard.", ["Name two oceans.\n", "Why so grumpy?"])
    _write(d, "persona_alpaca_specific_user_1.json", "A cheerful baker.", ["Best bread?"])
    _write(d, "persona_alpaca_general_user_1.json", "A cheerful baker.", ["Sum 2 and 2."], rubric_desc="A grumpy wizard.")
    return d


def test_loads_description_only_personas_with_their_questions(folder):
    cat = load_catalog(str(folder))
    assert list(cat.personas) == ["persona-alpaca-1", "rolebench-0"]
    wiz = cat["rolebench-0"]
    assert wiz.generate and not wiz.calibration and not wiz.evaluation
    assert wiz.description.startswith("You are roleplaying") and "grumpy wizard" in wiz.description
    assert wiz.questions == ("What is your wand made of?", "Why so grumpy?", "Name two oceans.")
    assert "{question}" in wiz.rubric
    # a rubric naming another persona is never used
    assert "cheerful baker" in cat["persona-alpaca-1"].rubric


def test_role_play_questions_come_from_the_file_and_never_train(folder):
    wiz = load_catalog(str(folder))["rolebench-0"]
    cfg = EvalConfig(max_questions=10)
    assert heldout_questions(cfg, wiz) == list(wiz.questions)
    extra = folder.parent / "train.txt"
    extra.write_text("why so GRUMPY?\nTell me a spell.\n")
    train = training_instructions(DataConfig(examples=1000, instructions=(str(extra),)), wiz.questions)
    assert "Tell me a spell." in train and not any("grumpy" in q.lower() for q in train)


def test_bad_files_are_named(folder):
    (folder / "rolebench_specific_user_2.json").write_text(json.dumps({"persona_description": "x"}))
    with pytest.raises(CatalogError) as err:
        load_catalog(str(folder))
    assert "rolebench_specific_user_2.json: field 'system_prompt': missing" in str(err.value)
    assert "field 'questions'" in str(err.value)


def test_judge_uses_the_persona_rubric():
    text = judge_prompt("desc", "Q?", "A!", "Rate: [Q] {question} [A] {answer}", 100)
    assert text == "Rate: [Q] Q? [A] A!"
    assert "0 to 9" in judge_prompt("desc", "Q?", "A!", "Rate {question} {answer}", 9)
    assert "desc" in judge_prompt("desc", "Q?", "A!", None, 100)


def test_the_shared_evaluation_sets():
    if not os.path.isdir(SHARED):
        pytest.skip("../shared/data/persona-pruner-eval is absent")
    cat = load_catalog(SHARED)
    assert len(cat) == 20
    assert sum(p.id.startswith("rolebench-") for p in cat) == 10
    for p in cat:
        assert len(p.questions) == 40 and p.rubric and p.generate
        core = p.description.split("persona: ", 1)[1].split("\n")[0]
        assert " ".join(core.split()) in " ".join(p.rubric.split())
