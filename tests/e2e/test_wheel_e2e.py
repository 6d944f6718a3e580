"""The distribution, built and installed as a user would (pip wheel, pip install into a folder): one
`rayrlhf` import root, the configs and the files they name found from any directory, and a tiny
`rayrlhf train` run from there."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.unit.test_package import run_python

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    source = out / "source"  # a copy, so that setuptools' build/ never lands in (or leaks stale files from) the repo
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "outputs", "wandb", "__pycache__", "*.egg-info", ".pytest_cache"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(source)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (path,) = out.glob("rayrlhf-*.whl")
    return path


def test_wheel_holds_one_import_root_and_the_configs(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.startswith("rayrlhf-")}
    assert top == {"rayrlhf"}
    for part in ("actors/learner.py", "cluster/actor_group.py", "jobs/cli.py", "jobs/config/run.py",
                 "jobs/data/task.py", "ray_configs/default.yaml", "ray_configs/tiny.yaml", "ray_configs/serve.yaml"):
        assert f"rayrlhf/{part}" in names
    assert not any("tests/" in n or "__pycache__" in n for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "rayrlhf = rayrlhf.jobs.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("site")
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                           str(wheel)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return target


def test_installed_wheel_finds_its_configs_from_any_directory(installed, tmp_path):
    target = installed
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = (
        "import rayrlhf.actors, rayrlhf.jobs.config.run as run\n"
        "print(rayrlhf.actors.__file__)\n"
        "print(run.resolve_config_path('tiny'))\n"
        "print(run.load_config().policy.model)\n"
    )
    done = run_python(code, elsewhere, PYTHONPATH=str(target))
    assert done.returncode == 0, done.stderr
    actors_file, tiny, model = done.stdout.split()
    assert actors_file.startswith(str(target)) and tiny == str(target / "rayrlhf/ray_configs/tiny.yaml")
    assert model == "smollm2-135m-instruct"


def test_every_tiny_config_and_the_files_it_names_work_from_an_installed_wheel(installed, tmp_path):
    """Data files and reward functions a shipped config names are read beside it, not in the working
    directory: each CPU config's data and functions load from the wheel, and math_tiny (which names
    both) trains there."""
    code = (
        "from rayrlhf.jobs.config.run import load_config\n"
        "from rayrlhf.jobs.config.supervised import RMConfig, SFTConfig, load_job_config\n"
        "from rayrlhf.jobs.train import prepare\n"
        "from rayrlhf.jobs import sft, train_rm\n"
        "for name in ('tiny', 'math_tiny', 'math', 'default'):\n"
        "    train_set, eval_set = prepare(load_config(name, ['output_dir=out/' + name]))\n"
        "    print(name, len(train_set), len(eval_set))\n"
        "print('sft_tiny', len(sft.prepare(load_job_config(SFTConfig, 'sft_tiny', [], 'sft.yaml'))[1]))\n"
        "print('rm_tiny', len(train_rm.prepare(load_job_config(RMConfig, 'rm_tiny', [], 'rm.yaml'))[1]))\n"
    )
    done = run_python(code, tmp_path, PYTHONPATH=str(installed))
    assert done.returncode == 0, done.stderr[-3000:]
    counts = dict(line.split(" ", 1) for line in done.stdout.strip().splitlines())
    assert counts["math_tiny"] == "36 4" and set(counts) == {"tiny", "math_tiny", "math", "default", "sft_tiny", "rm_tiny"}
    done = subprocess.run([sys.executable, "-m", "rayrlhf.jobs.cli", "train", "--config", "math_tiny",
                           "--set", "steps=1", "--set", "kl.coef=0", "--set", "output_dir=run"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env={**__import__("os").environ, "PYTHONPATH": str(installed)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
