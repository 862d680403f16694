"""`persona-jobs generate`: conditions side by side, streamed, greedy or seeded sampling; `--interactive`
with piped stdin; the closing lines of a run that say how to talk to a persona."""

from __future__ import annotations

import io
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from persona_core.api import Conversation, read_mask
from persona_core.catalog import load_catalog
from persona_core.masks.build import build_masks
from persona_core.masks.codec import write_mask
from persona_core.masks.spec import MaskSpec
from persona_core.models.loading import load_model
from persona_core.store import layout
from persona_core.store.store import open_store
from persona_jobs.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    loaded = load_model("tiny-random-llama", device="cpu")
    root = tmp_path_factory.mktemp("generate") / "store"
    key = layout.mask(loaded.key, layout.method_segment("wanda"), 0.5, "introvert")
    write_mask(open_store(str(root)), key, build_masks(loaded, spec=MaskSpec("magnitude", 0.5)), {"method": "wanda"})
    return root


def args(store_dir, *rest: str) -> list[str]:
    return ["generate", "--store", str(store_dir), "--model", "tiny-random-llama", "--catalog", "builtin",
            "--persona", "introvert", *rest]


def expected(store_dir, condition: str, prompt: str, **kw) -> str:
    """The answer the library gives under `condition` (what the command must print)."""
    loaded = load_model("tiny-random-llama", device="cpu")
    catalog = load_catalog("builtin")
    store = open_store(str(store_dir))
    mask = read_mask(store, layout.mask(loaded.key, layout.method_segment("wanda"), 0.5, "introvert"))
    talk = Conversation(loaded, catalog["introvert"], catalog["extrovert"], mask)
    return talk.reply(condition, prompt, **kw)


def test_conditions_side_by_side_streamed(store_dir, capsys):
    assert main(args(store_dir, "--condition", "dense,dense+prompt,dense+fewshot,masked,masked+prompt",
                     "--max-new-tokens", "8", "Hello there")) == 0
    out = capsys.readouterr().out
    heads = [line for line in out.splitlines() if line.startswith("── ")]
    assert heads == ["── dense ──", "── dense+prompt ──", "── dense+fewshot ──",
                     "── masked: wanda sparsity=0.5 ──", "── masked+prompt: wanda sparsity=0.5 ──"]
    sections = dict(zip(heads, [s.strip() for s in out.split("── ")[1:]]))
    masked = expected(store_dir, "masked", "Hello there", max_new_tokens=8)
    dense = expected(store_dir, "dense", "Hello there", max_new_tokens=8)
    assert masked != dense  # the mask changes what the model says
    assert sections["── masked: wanda sparsity=0.5 ──"].endswith(masked)
    assert sections["── dense ──"].endswith(dense)


def test_streaming_delivers_the_answer_piece_by_piece(store_dir):
    pieces: list[str] = []
    answer = expected(store_dir, "masked", "Hi", max_new_tokens=6, on_text=pieces.append)
    assert len(pieces) > 1 and "".join(pieces).strip() == answer


def test_sampling_is_seeded(store_dir, capsys):
    outs = []
    for seed in ("1", "1", "2"):
        assert main(args(store_dir, "--condition", "masked", "--temperature", "1.0", "--seed", seed,
                         "--max-new-tokens", "12", "Tell me")) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0] != outs[2]


def test_interactive_with_piped_stdin(store_dir, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\nAnd then?\n\nnot read\n"))
    assert main(args(store_dir, "--interactive", "--max-new-tokens", "5")) == 0
    out = capsys.readouterr().out
    assert "you> Hi" in out and "you> And then?" in out and "not read" not in out
    assert out.count("introvert> ") == 2


def test_interactive_in_a_real_pipe(store_dir):
    """The console entry point with its stdin a pipe, as `printf ... | persona-jobs generate --interactive`."""
    cmd = [sys.executable, "-m", "persona_jobs", *args(store_dir, "--interactive", "--max-new-tokens", "4")]
    done = subprocess.run(cmd, input="Hi\nMore?\n", capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("introvert> ") == 2 and "you> More?" in done.stdout


def test_the_second_turn_sees_the_first(store_dir):
    loaded = load_model("tiny-random-llama", device="cpu")
    catalog = load_catalog("builtin")
    talk = Conversation(loaded, catalog["introvert"], None, None)
    talk.reply("dense", "Hi", max_new_tokens=3, keep=True)
    assert [m["role"] for m in talk.history] == ["user", "assistant"]
    dense = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    with pytest.raises(Exception, match="needs a mask"):
        talk.reply("masked", "Hi")
    assert all(torch.equal(v, dense[k]) for k, v in loaded.model.state_dict().items())


def test_bad_input_is_one_line(store_dir, capsys):
    assert main(args(store_dir, "--interactive", "prompt too")) == 2
    assert main(args(store_dir, "--condition", "dense,masked", "--interactive")) == 2
    assert main(["generate", "--store", str(store_dir), "--model", "tiny-random-llama", "--persona", "extrovert",
                 "--condition", "masked", "Hi"]) == 2  # no mask of extrovert
    err = capsys.readouterr().err
    assert "no mask of persona 'extrovert'" in err


def test_a_runs_closing_lines_say_how_to_talk_to_a_persona():
    from persona_core.run.plan import make_plan
    from persona_jobs.flags import load
    from persona_jobs.generate import next_steps

    lines = next_steps(make_plan(load("configs/demo.yaml", {})), "configs/demo.yaml")
    commands = [shlex.split(line[line.index("persona-jobs"):]) for line in lines if "persona-jobs" in line]
    assert len(commands) == 3 and "generate" in commands[0] and "--interactive" in commands[1]
    for words in commands:
        assert build_parser().parse_args(words[1:]).command in ("generate", "export")


def test_steering_from_the_stored_statistics(tmp_path, capsys):
    """dense+steer: vectors from the persona's and its opposite's statistics, chosen as the evaluator does."""
    from persona_core.calib.config import CalibConfig
    from persona_core.calib.parts import write_stats
    from persona_core.calib.recorder import calibrate_persona

    loaded = load_model("tiny-random-llama", device="cpu")
    catalog = load_catalog("builtin")
    store = open_store(str(tmp_path / "store"))
    calib = CalibConfig(max_length=64)
    for pid in ("introvert", "extrovert"):
        stats, generated = calibrate_persona(loaded, catalog[pid], calib)
        write_stats(store, stats, generated=generated, calib_config=calib.to_dict())
    argv = ["generate", "--store", str(tmp_path / "store"), "--model", "tiny-random-llama", "--catalog", "builtin",
            "--persona", "introvert", "--calib-hash", calib.hash, "--max-new-tokens", "6"]
    assert main([*argv, "--condition", "dense,dense+steer", "Hi"]) == 0
    out = capsys.readouterr().out
    sections = [s.strip() for s in out.split("── ")[1:]]
    assert sections[0].startswith("dense ──") and sections[1].startswith("dense+steer ──")
    from persona_core.calib.stored import read_persona_stats

    stats = {pid: read_persona_stats(store, loaded.key, pid, calib_hash=calib.hash) for pid in ("introvert", "extrovert")}
    talk = Conversation(loaded, catalog["introvert"], catalog["extrovert"], None, stats=stats)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        dense = loaded.model(ids).logits
        with talk.condition("dense+steer"):
            steered = loaded.model(ids).logits
        assert torch.equal(loaded.model(ids).logits, dense)  # the hook is off again
    assert not torch.equal(steered, dense)  # the hook was on
    from persona_core.api import talk_conditions
    from persona_core.eval.conditions import CONDITIONS

    for name in set(CONDITIONS) - set(talk_conditions()):  # steering trained in an evaluation: refused at parse
        with pytest.raises(SystemExit) as exit_:
            main([*argv, "--condition", name, "Hi"])
        assert exit_.value.code == 2


def test_a_runs_closing_lines_work_on_its_store(pipeline_store, tmp_path, capsys):
    """`persona-jobs run` ends with the commands that talk to a persona and export it; both work as printed."""
    import yaml

    from tests.conftest import TINY_PIPELINE

    root, _ = pipeline_store
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY_PIPELINE, "store": str(root)}))
    assert main(["run", "--config", str(config)]) == 0  # finished already: nothing is recomputed
    lines = [line for line in capsys.readouterr().out.splitlines() if "persona-jobs " in line]
    generate, interactive, export = (shlex.split(line[line.index("persona-jobs"):])[1:] for line in lines)
    assert generate[:3] == ["generate", "--config", str(config)] and "--interactive" in interactive
    assert main([*generate[:-1], "--max-new-tokens", "4", generate[-1]]) == 0
    out = capsys.readouterr().out
    assert "── dense ──" in out and "── masked: contrastive-wanda sparsity=0.5 ──" in out
    assert main([*export[:-1], str(tmp_path / "introvert-model")]) == 0
    assert (tmp_path / "introvert-model" / "model.safetensors").is_file()
