"""The distribution: one `rayrlhf` import root, configs shipped in the wheel, a CLI that starts fast."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "deepspeed", "ray.tune", "ray.serve", "ray")


def run_python(code: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, **env})


def test_cli_imports_nothing_heavy_for_help_or_a_config_error(tmp_path):
    code = (
        "import sys\n"
        "from rayrlhf.jobs import cli\n"
        "loaded = [m for m in %r if m in sys.modules]\n"
        "assert not loaded, loaded\n"
        "assert cli.main(['train', '--set', 'learner.zero_stage=9']) == 2\n"
        "assert cli.main(['tune', '--set', 'search.num_samples=0']) == 2\n"
        "loaded = [m for m in %r if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    ) % (HEAVY, HEAVY)
    done = run_python(code, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "learner.zero_stage" in done.stderr and "search.num_samples" in done.stderr


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


def import_graph() -> dict[str, set[str]]:
    """Module -> the rayrlhf modules it imports anywhere (top level, functions, TYPE_CHECKING blocks)."""
    import ast

    graph: dict[str, set[str]] = {}
    for part in ("actors", "cluster", "jobs"):
        for path in (REPO / part).rglob("*.py"):
            module = "rayrlhf." + ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            targets = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rayrlhf."):
                    targets.add(node.module)
                elif isinstance(node, ast.Import):
                    targets.update(a.name for a in node.names if a.name.startswith("rayrlhf."))
            graph[module] = targets
    return graph


def test_no_import_cycles_and_actors_never_import_the_drivers():
    graph = import_graph()
    assert "rayrlhf.jobs.cli" in graph and "rayrlhf.actors.learner" in graph

    def cycle_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    return path + [nxt]
                if nxt not in path:
                    stack.append((nxt, path + [nxt]))
        return None

    cycles = [c for m in graph if (c := cycle_from(m))]
    assert not cycles, cycles[0]
    # actors may name a config section in a type hint (TYPE_CHECKING) but import no driver or launch code
    wrong = {m: t for m, deps in graph.items() if m.startswith("rayrlhf.actors")
             for t in deps if t.startswith(("rayrlhf.cluster", "rayrlhf.jobs")) and not t.startswith("rayrlhf.jobs.config")}
    assert not wrong, wrong
    # the roles sit at the root of actors/ and are leaves: nothing below them (nor another role) imports one
    roles = {f"rayrlhf.actors.{r}" for r in ("learner", "rollout_worker", "reference_policy", "reward_scorer",
                                             "environment_worker")}  # fmt: skip
    assert roles <= set(graph)
    into_roles = {m: deps & roles for m, deps in graph.items() if m.startswith("rayrlhf.actors") and deps & roles}
    assert not into_roles, into_roles
    # the generation engine serves both the rollout and Serve: it imports neither (serving imports it)
    upward = {m: t for m, deps in graph.items() if m.startswith("rayrlhf.actors.generation")
              for t in deps if t.startswith("rayrlhf.actors.serving")}
    assert not upward, upward
    loose = {f"rayrlhf.actors.{p.stem}" for p in (REPO / "actors").glob("*.py") if p.stem != "__init__"} - roles
    assert not loose, f"actors/ holds the roles and subpackages only: {sorted(loose)}"


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
                           "--set", "steps=1", "--set", "output_dir=run"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env={**__import__("os").environ, "PYTHONPATH": str(installed)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
