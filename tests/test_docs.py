"""Every command and query in README.md, docs/, results/ and benchmarks/README.md is checked here.

* ```` ```sh ```` blocks: every `persona-jobs ...` / `python -m persona_jobs[.<job>] ...` line is
  parsed by the real CLI parser (`persona_jobs.cli.build_parser`; parsing never runs a job), so a
  documented flag that does not exist, or a missing argument, fails the test; `submit -- <command>`
  parses the command after `--` too; `--config` files and local `--catalog` paths exist. `make X`
  targets exist in the Makefile; `python benchmarks/x.py --flag` scripts exist and define the flags
  shown; `pytest` lines name existing test files and registered markers.
* ```` ```python ```` blocks compile and their imports resolve; blocks marked ```` ```python run ````
  are executed: the pyarrow queries against a small stats store written here, the notebook
  evaluation with `tiny-random-llama` in place of the default model.
* README's config block is `configs/demo.yaml`; every `configs/*.yaml` named exists; every relative
  link (and its #anchor) resolves; every `persona_core/...` / `persona_jobs/...` path named exists.

What the documented commands do when they really run is covered elsewhere: `run` / `nightly`
(tests/test_pipeline.py), `calibrate` (test_calibrate_job.py), `build-masks` (test_build_masks_job.py,
test_budget.py), `learn-masks` (test_learn_masks_job.py), `evaluate` (test_evaluate_job.py), `submit`
and `status` (test_submit.py), `stats` (test_stats.py), `catalog` (test_catalog.py), `methods` and
`metrics` (test_cli.py), `make demo` (tests/test_packaging.py builds what it installs; CI runs
`make test`).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import importlib
import io
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md",
             *sorted((ROOT / "results").glob("*.md"))]
FENCE = re.compile(r"^```([\w-]+)((?: [\w-]+)*)\n(.*?)^```$", re.M | re.S)


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def blocks(lang: str) -> list[tuple[str, str, str]]:
    """(file, info words after the language, body) of every fenced block of `lang`."""
    out = []
    for path in DOC_FILES:
        for m in FENCE.finditer(path.read_text()):
            if m.group(1) == lang:
                out.append((rel(path), m.group(2).strip(), m.group(3)))
    return out


def command_lines(body: str) -> list[list[str]]:
    """Shell lines of a block, continuations joined, comments dropped, split like a shell would."""
    out, pending = [], ""
    for line in body.splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        words = shlex.split(pending + line, comments=True)
        pending = ""
        if words:
            out.append(words)
    return out


SH_LINES = [(f, words) for f, _, body in blocks("sh") for words in command_lines(body)]


# ---------------------------------------------------------------------------- persona-jobs

@functools.lru_cache(maxsize=1)
def parser() -> argparse.ArgumentParser:
    from persona_jobs.cli import build_parser

    return build_parser()


class BadCommand(AssertionError):
    pass


def check_cli(argv: list[str]) -> None:
    """Parse `persona-jobs <argv>` with the real parser (nothing runs); raise BadCommand if it fails."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            args = parser().parse_args(argv)
    except SystemExit as exit_:
        if exit_.code == 0 and ("--help" in argv or "-h" in argv):
            return
        raise BadCommand(f"persona-jobs {shlex.join(argv)}: {err.getvalue().strip().splitlines()[-1:]}") from None
    if args.command == "submit":
        rest = list(args.subcommand)
        if rest[:1] == ["--"]:
            rest = rest[1:]
        if not rest:
            raise BadCommand(f"persona-jobs {shlex.join(argv)}: no command after --")
        check_cli(rest)
    config = getattr(args, "config", None)
    if config and not (ROOT / config).is_file():
        raise BadCommand(f"persona-jobs {shlex.join(argv)}: no config file {config}")
    for value in (getattr(args, "catalog", None), getattr(args, "path", None)):
        if value and not _remote_or_builtin(value) and not (ROOT / value).exists():
            raise BadCommand(f"persona-jobs {shlex.join(argv)}: no catalog at {value}")


def _remote_or_builtin(value: str) -> bool:
    # builtin, URLs and the shared data sets next to the checkout (not part of it)
    return value == "builtin" or "://" in value or value.startswith("../shared/")


def cli_argv(words: list[str]) -> list[str] | None:
    """The persona-jobs argv of a documented line, or None when the line is another kind of command."""
    if words[0] == "persona-jobs":
        return words[1:]
    if Path(words[0]).name == "python" and words[1:2] == ["-m"] and words[2].split(".")[0] == "persona_jobs":
        module = words[2]
        if module == "persona_jobs":
            return words[3:]
        path = ROOT / (module.replace(".", "/") + ".py")
        assert path.is_file() and 'if __name__ == "__main__"' in path.read_text(), f"python -m {module}: no such entry point"
        return [module.split(".", 1)[1].replace("_", "-"), *words[3:]]
    return None


@pytest.mark.parametrize("doc,words", [pytest.param(f, w, id=f"{f}:{' '.join(w)[:60]}") for f, w in SH_LINES
                                       if cli_argv(w) is not None])
def test_documented_command_parses(doc, words):
    check_cli(cli_argv(words))


def test_a_documented_flag_that_does_not_exist_fails():
    check_cli(["run", "--config", "configs/demo.yaml"])
    for bad in (["run", "--config", "configs/demo.yaml", "--no-such-flag"],
                ["build-masks", "--methd", "wanda"],
                ["run", "--config", "configs/no-such.yaml"],
                ["submit", "--address", "http://head:8265", "--", "run", "--bogus"],
                ["no-such-command"]):
        with pytest.raises(BadCommand):
            check_cli(bad)


# ---------------------------------------------------------------------------- make, benchmarks, pytest

def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return {t for m in re.finditer(r"^([\w. -]+):(?!=)", text, re.M) for t in m.group(1).split()}


def test_every_sh_line_is_a_known_kind_of_command():
    kinds = ("make", "persona-jobs")
    for doc, words in SH_LINES:
        ok = (words[0] in kinds or cli_argv(words) is not None or benchmark(words) is not None
              or pytest_args(words) is not None)
        assert ok, f"{doc}: `{shlex.join(words)}` is no command this test knows how to check"


@pytest.mark.parametrize("doc,words", [pytest.param(f, w, id=f"{f}:{' '.join(w)}") for f, w in SH_LINES
                                       if w[0] == "make"])
def test_documented_make_target_exists(doc, words):
    missing = [t for t in words[1:] if "=" not in t and t not in make_targets()]
    assert not missing, f"{doc}: make {' '.join(missing)}: no such target in the Makefile"


def benchmark(words: list[str]) -> list[str] | None:
    if Path(words[0]).name == "python" and len(words) > 1 and words[1].startswith("benchmarks/"):
        return words[1:]
    return None


@pytest.mark.parametrize("doc,words", [pytest.param(f, w, id=f"{f}:{' '.join(w)[:60]}") for f, w in SH_LINES
                                       if benchmark(w) is not None])
def test_documented_benchmark_exists_and_takes_its_flags(doc, words):
    script, *args = benchmark(words)
    path = ROOT / script
    assert path.is_file(), f"{doc}: no {script}"
    source = path.read_text()
    for flag in (a.split("=", 1)[0] for a in args if a.startswith("--")):
        assert f'"{flag}"' in source, f"{doc}: {script} has no option {flag}"
    for value in args:
        if value.startswith("configs/"):
            assert (ROOT / value).is_file(), f"{doc}: no {value}"


def pytest_args(words: list[str]) -> list[str] | None:
    if Path(words[0]).name == "python" and words[1:3] == ["-m", "pytest"]:
        return words[3:]
    return None


@pytest.mark.parametrize("doc,words", [pytest.param(f, w, id=f"{f}:{' '.join(w)}") for f, w in SH_LINES
                                       if pytest_args(w) is not None])
def test_documented_pytest_line_names_real_tests_and_markers(doc, words):
    args = pytest_args(words)
    markers = {"ray", "slow", "integration"}
    for i, a in enumerate(args):
        if a == "-m":
            names = set(re.findall(r"\w+", args[i + 1])) - {"and", "or", "not"}
            assert names <= markers, f"{doc}: unknown markers {names - markers}"
        elif a.startswith("tests/"):
            assert (ROOT / a.split("::")[0]).is_file(), f"{doc}: no {a}"


# ---------------------------------------------------------------------------- python blocks

PY_BLOCKS = blocks("python")


@pytest.mark.parametrize("doc,info,body", [pytest.param(*b, id=f"{b[0]}:{i}") for i, b in enumerate(PY_BLOCKS)])
def test_python_block_compiles_and_its_imports_resolve(doc, info, body):
    tree = ast.parse(body, filename=doc)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{doc}: {node.module} has no {alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                importlib.import_module(alias.name)


@pytest.fixture
def doc_store(tmp_path, monkeypatch):
    """./persona-store with two opposing personas of a toy 13-layer model, two shards each (the
    layout `calibrate` writes), and the current folder set to where it lies."""
    from test_stats import MODEL, PersonaStats, Shard, fake_groups, open_store, write_stats  # the same toy stats

    store = open_store(str(tmp_path / "persona-store"))
    for i, pid in enumerate(["introvert", "extrovert"]):
        for shard in range(2):
            stats = PersonaStats(MODEL, pid, "p1", fake_groups(2 * i + shard + 1, layers=13), "c1")
            write_stats(store, stats, Shard(shard, 2, 5))
    monkeypatch.chdir(tmp_path)
    return store


RUN_BLOCKS = [b for b in PY_BLOCKS if "run" in b[1].split()]


def test_the_runnable_blocks_are_the_ones_expected():
    assert {doc for doc, _, _ in RUN_BLOCKS} == {"README.md", "docs/calibration.md", "docs/evaluation.md"}


# The notebook evaluation loads a model and writes a report (many seconds): slow, so not in `make check`.
@pytest.mark.parametrize("doc,info,body", [
    pytest.param(*b, id=b[0], marks=[pytest.mark.slow] if b[0] == "docs/evaluation.md" else []) for b in RUN_BLOCKS])
def test_runnable_python_block_runs(doc, info, body, doc_store):
    scope: dict = {"__name__": "__doc__"}
    if doc == "docs/evaluation.md":
        body = body.replace('Evaluator("smollm2-135m")', 'Evaluator("tiny-random-llama", device="cpu")')
        assert "tiny-random-llama" in body
    exec(compile(body, doc, "exec"), scope)
    if doc == "docs/calibration.md":
        assert scope["top20"].num_rows == 8  # every mlp_in channel of the toy model, most different first
        assert sorted(scope["per_persona"]["persona"].to_pylist()) == ["extrovert", "introvert"]
        assert scope["per_layer"].num_rows == 13 * 4
    elif doc == "README.md":
        assert sorted(scope["tokens"]["persona"].to_pylist()) == ["extrovert", "introvert"]
    elif doc == "docs/evaluation.md":
        assert scope["table"].num_rows > 0 and Path("report.html").is_file()


# ---------------------------------------------------------------------------- configs, links, paths

def test_readme_config_is_the_demo_config():
    readme_yaml = [body for doc, _, body in blocks("yaml") if doc == "README.md"]
    assert readme_yaml, "README.md shows no config"
    assert yaml.safe_load(readme_yaml[0]) == yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())


def test_every_config_named_exists():
    for path in DOC_FILES:
        for name in set(re.findall(r"\bconfigs/[\w.-]+\.yaml\b", path.read_text())):
            assert (ROOT / name).is_file(), f"{rel(path)} names {name}, which does not exist"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_relative_link_resolves():
    for path in DOC_FILES:
        text = path.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if "://" in target or target.startswith("mailto:"):
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            assert dest.exists(), f"{rel(path)}: link to {target}: no such file"
            if anchor and dest.suffix == ".md":
                anchors = {slug(h) for h in re.findall(r"^#+ (.+)$", dest.read_text(), re.M)}
                assert anchor in anchors, f"{rel(path)}: link to {target}: no heading with that anchor"


def test_every_code_path_named_exists():
    for path in DOC_FILES:
        for name in set(re.findall(r"`((?:persona_core|persona_jobs)/[\w/.]*)`", path.read_text())):
            assert (ROOT / name).exists(), f"{rel(path)} names {name}, which does not exist"
        for name in set(re.findall(r"`((?:persona_core|persona_jobs)(?:\.\w+)+)`", path.read_text())):
            parts = name.split(".")
            for cut in range(len(parts), 0, -1):
                try:
                    obj = importlib.import_module(".".join(parts[:cut]))
                except ModuleNotFoundError:
                    continue
                for attr in parts[cut:]:
                    assert hasattr(obj, attr), f"{rel(path)} names {name}, which does not exist"
                    obj = getattr(obj, attr)
                break
            else:
                raise AssertionError(f"{rel(path)} names {name}, which does not exist")


def test_every_test_benchmark_and_cluster_file_named_exists():
    for path in DOC_FILES:
        for name in set(re.findall(r"`((?:tests|benchmarks|cluster)/[\w/.-]+(?:::\w+)?)`", path.read_text())):
            file, _, test = name.partition("::")
            assert (ROOT / file).exists(), f"{rel(path)} names {file}, which does not exist"
            if test:
                assert re.search(rf"^def {test}\(", (ROOT / file).read_text(), re.M), f"{rel(path)} names {name}"


def test_learner_knob_table_states_the_defaults():
    """docs/learned-masks.md's knob table agrees with `LearnConfig`'s defaults."""
    import dataclasses

    from persona_core.learn.config import LearnConfig

    defaults = {f.name: f.default for f in dataclasses.fields(LearnConfig)}
    text = (ROOT / "docs" / "learned-masks.md").read_text()
    checked = 0
    for names, values in re.findall(r"^\| ((?:`\w+`(?:, )?)+) \| ([^|]+) \|", text, re.M):
        names = re.findall(r"`(\w+)`", names)
        values = [v.strip() for v in values.split(",")]
        for name, value in zip(names, values):
            if name in defaults:
                assert value == str(defaults[name]), f"docs/learned-masks.md: {name} {value}, LearnConfig {defaults[name]}"
                checked += 1
    assert checked >= 10
