"""A normal (non-editable) install works (issue 12 item 13): configs ship inside the package,
every imported library is declared, and submit never uploads the folder an install lives in."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_dependencies_are_declared():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {d.split(">")[0].split("=")[0].split("[")[0].strip().lower() for d in deps}
    assert {"pandas", "pydantic", "pyyaml", "ray", "pyarrow"} <= names


@pytest.mark.slow
def test_wheel_ships_configs_and_only_our_packages(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=600)
    wheel = next(tmp_path.glob("*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {
        "persona_core", "persona_jobs"}
    shipped = {Path(n).name for n in names if n.startswith("persona_jobs/configs/")}
    assert shipped == {p.name for p in (ROOT / "configs").glob("*.yaml")}
    assert "persona_core/data/catalog.yaml" in names


def test_config_by_its_shipped_name_from_any_folder(tmp_path, monkeypatch):
    from persona_jobs import flags
    from persona_jobs.cli import build_parser

    monkeypatch.chdir(tmp_path)  # no configs/ here: the installed copy is used
    path = flags.config_path("configs/demo.yaml")
    assert path.is_file() and path.name == "demo.yaml"
    cfg = flags.config_from_args(build_parser().parse_args(["run", "--config", "configs/demo.yaml"]))
    assert cfg.masks.methods == ["contrastive-penalty"]
    assert flags.config_path("my/own.yaml") == Path("my/own.yaml")  # a user's path is never swapped


class FakeJobs:
    def __init__(self):
        self.submitted = []

    def get_job_info(self, sid):
        raise RuntimeError("404")

    def submit_job(self, **kwargs):
        self.submitted.append(kwargs)


def test_submit_from_an_installed_package_uploads_no_folder(tmp_path, monkeypatch):
    from persona_jobs import submit

    site = tmp_path / "site-packages"
    (site / "persona_jobs").mkdir(parents=True)  # what an install looks like: no pyproject.toml
    monkeypatch.setattr(submit, "ROOT", site)
    assert submit.project_root() is None
    jobs = FakeJobs()
    submit.submit(["catalog", "validate", "builtin"], jobs_client=jobs)
    env = jobs.submitted[0]["runtime_env"]
    assert str(site) not in str(env) and "working_dir" not in env


def test_submit_from_a_checkout_uploads_the_checkout():
    from persona_jobs import submit

    assert submit.project_root() == ROOT
    jobs = FakeJobs()
    submit.submit(["catalog", "validate", "builtin"], jobs_client=jobs)
    assert jobs.submitted[0]["runtime_env"]["working_dir"] == str(ROOT)
