"""The package's layout: a CLI that starts fast, no import cycles, roles at the root of actors/ (the
wheel itself: tests/e2e/test_wheel_e2e.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
