"""The command line (issue 12 item 15): one list convention, help on every option, -v anywhere,
--version, and the registries listed."""

from __future__ import annotations

import argparse

import pytest

from persona_jobs.cli import _leaf_parsers, build_parser, main


def test_every_option_of_every_subcommand_has_help():
    missing = []
    for p in _leaf_parsers(build_parser()):
        for action in p._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if not (action.help or "").strip():
                missing.append(f"{p.prog} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, f"options without help: {missing}"


@pytest.mark.parametrize("cmd,extra", [
    (["run"], []),
    (["nightly"], []),
    (["calibrate"], ["--catalog", "builtin"]),
    (["build-masks"], []),
    (["evaluate"], []),
    (["learn-masks"], []),
])
def test_one_list_convention_everywhere(cmd, extra):
    parser = build_parser()
    forms = (["--personas", "a,b", "--sparsities", "0.3,0.5"] if cmd[0] not in ("calibrate",) else ["--personas", "a,b"],
             ["--personas", "a", "b"] + (["--sparsities", "0.3", "0.5"] if cmd[0] != "calibrate" else []),
             ["--personas", "a", "--personas", "b"] + (["--sparsities", "0.3", "--sparsities", "0.5"]
                                                      if cmd[0] != "calibrate" else []))
    parsed = [parser.parse_args([*cmd, *extra, *f]) for f in forms]
    assert all(a.personas == ["a", "b"] for a in parsed)
    if cmd[0] != "calibrate":
        assert all(a.sparsities == [0.3, 0.5] for a in parsed)


def test_methods_flag_is_spelled_the_same_in_run_build_masks_and_evaluate():
    parser = build_parser()
    for cmd in (["run"], ["build-masks"], ["evaluate"]):
        assert parser.parse_args([*cmd, "--methods", "wanda,magnitude"]).methods == ["wanda", "magnitude"]
        assert parser.parse_args([*cmd, "--method", "wanda", "--method", "magnitude"]).methods == ["wanda",
                                                                                                  "magnitude"]


def test_bad_list_value_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["build-masks", "--granularities", "unstructured,blocky"])
    assert exc.value.code == 2 and "blocky" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--sparsities", "half"])


def test_verbose_before_or_after_the_subcommand():
    parser = build_parser()
    assert parser.parse_args(["-v", "methods"]).verbose is True
    assert parser.parse_args(["methods", "-v"]).verbose is True
    assert parser.parse_args(["stats", "list", "-v"]).verbose is True
    assert parser.parse_args(["methods"]).verbose is False


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("persona-jobs ")


def test_methods_and_metrics_list_the_registries(capsys):
    from persona_core.masks.methods import METHODS
    from persona_core.eval.metrics import METRICS

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in METHODS)
    assert main(["metrics"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in METRICS)


def test_revision_flag_reaches_the_config():
    from persona_jobs.flags import config_from_args

    args = build_parser().parse_args(["run", "--model", "tiny-random-llama", "--revision", "7"])
    cfg = config_from_args(args)
    assert (cfg.model, cfg.revision) == ("tiny-random-llama", "7")
