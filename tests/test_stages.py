"""Plan -> Stage is the only path (issue 23): every stage takes exactly a Plan, and no function of the
Ray layer takes more than 8 parameters (the plan carries what it resolved; nothing is spread)."""

from __future__ import annotations

import ast
import inspect
import typing
from pathlib import Path

import pytest

from persona_core.run.plan import Plan
from persona_jobs import build_masks, calibrate, evaluate, learn_masks, report
from persona_jobs.stages import MASKS, STAGES

ROOT = Path(__file__).resolve().parent.parent
MAX_PARAMS = 8  # positional + keyword-only, self/cls excluded, *args and **kwargs one each
STAGE_MAX_PARAMS = 2  # self included
JOB_STAGES = {"calibrate": calibrate, "build-masks": build_masks, "learn-masks": learn_masks,
              "masks": MASKS, "evaluate": evaluate, "report": report}


def test_the_pipeline_runs_these_stages_in_order():
    assert list(STAGES) == ["calibrate", "masks", "evaluate", "report"]
    assert set(STAGES.values()) <= set(JOB_STAGES.values())


@pytest.mark.parametrize("name", sorted(JOB_STAGES))
def test_every_stage_run_takes_exactly_a_plan(name):
    run = JOB_STAGES[name].run
    params = list(inspect.signature(run).parameters.values())  # a bound method's: without self
    assert len(params) == 1, f"{name}.run{inspect.signature(run)}: takes exactly a Plan"
    (param,) = params
    assert param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD) and param.default is param.empty
    assert typing.get_type_hints(run)[param.name] is Plan, f"{name}.run: its parameter is annotated Plan"
    whole = run.__func__ if inspect.ismethod(run) else run
    assert len(inspect.signature(whole).parameters) <= STAGE_MAX_PARAMS


def _param_count(fn: ast.FunctionDef | ast.AsyncFunctionDef, in_class: bool) -> int:
    a = fn.args
    positional = [*a.posonlyargs, *a.args]
    if in_class and positional and positional[0].arg in ("self", "cls"):
        positional = positional[1:]
    return len(positional) + len(a.kwonlyargs) + (a.vararg is not None) + (a.kwarg is not None)


def _functions(tree: ast.AST):
    """(function, whether it is a method) for every function and method, nested ones included."""
    def walk(node, in_class):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield child, in_class
                yield from walk(child, False)
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, True)
            else:
                yield from walk(child, in_class)
    yield from walk(tree, False)


def test_no_function_of_the_ray_layer_takes_more_than_eight_parameters():
    files = sorted((ROOT / "persona_jobs").rglob("*.py"))
    assert len(files) > 10
    too_many = []
    for path in files:
        for fn, method in _functions(ast.parse(path.read_text(), str(path))):
            n = _param_count(fn, method)
            if n > MAX_PARAMS:
                too_many.append(f"{path.relative_to(ROOT)}:{fn.lineno} {fn.name}: {n} parameters")
    assert not too_many, "\n".join(too_many)


def test_the_parameter_count_sees_every_kind_of_parameter():
    code = "def f(a, /, b, *c, d, **e): pass\nclass K:\n    def m(self, a, *, b): pass\n"
    found = {fn.name: _param_count(fn, method) for fn, method in _functions(ast.parse(code))}
    assert found == {"f": 5, "m": 2}


def test_every_subcommand_turns_its_flags_into_a_plan(tmp_path):
    """Flags are config overrides, resolved once by make_plan; what the config has no key for (the
    personas as named, the statistics stored, where actors run) is the plan's Selection and Placement."""
    from persona_core.run.plan import make_plan
    from persona_jobs.cli import build_parser
    from persona_jobs.flags import config_from_args

    where = ["--store", str(tmp_path / "st"), "--model", "tiny-random-llama"]

    def parse(*argv):
        return build_parser().parse_args([*argv[:1], *where, *argv[1:]])

    c = calibrate.plan_from_args(parse("calibrate", "--catalog", "builtin", "--personas", "introvert",
                                       "--max-length", "32", "--shard-size", "8", "--device", "cpu"))
    assert c.calib.max_length == 32 and c.config.calibrate.shard_size == 8
    assert c.selection.personas == ("introvert",) and c.placement.device == "cpu"
    b = build_masks.plan_from_args(parse("build-masks", "--method", "wanda", "--sparsity", "0.3",
                                         "--granularity", "2:4", "--delta"))
    assert [(s.method, s.sparsity, s.granularity) for s in b.specs] == [("wanda", 0.5, "2:4")]  # N:M fixes it
    assert b.config.masks.options.delta and not b.selection.by_catalog
    lm = learn_masks.plan_from_args(parse("learn-masks", "--steps", "3", "--objective", "prompt-free",
                                          "--retries", "1"))
    assert lm.learn.steps == 3 and lm.config.masks.learned.objectives == ["prompt-free"]
    assert lm.placement.retries == 1
    e = evaluate.plan_from_args(parse("evaluate", "--methods", "contrastive-*", "--max-statements", "5",
                                      "--run-id", "r"))
    assert e.eval.max_statements == 5 and e.selection.methods == ("contrastive-*",) and e.run_id == "r"
    r = make_plan(config_from_args(parse("run", "--personas", "introvert", "--sparsities", "0.3")))
    assert r.selection is None and set(r.persona_ids) == {"introvert", "extrovert"}  # opposites come along
    assert {s.sparsity for s in r.specs} == {0.3}
