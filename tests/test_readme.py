"""The README's runnable Python examples (blocks that import memzoo) must run as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if "import memzoo" in b]


def test_readme_has_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(code):
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})


def test_readme_status_table_names_every_mixer():
    import memzoo

    table = README.read_text().split("## Status", 1)[1].split("\n\n", 2)[1]
    for name, cls in memzoo.MIXERS.items():
        assert f"`{name}`" in table and f"`{cls.__name__}`" in table, name
    from memzoo.models.wrappers.base import WRAPPERS

    for cls in (*WRAPPERS.values(), memzoo.DiscreteKVBottleneck):
        assert f"wrapper `{cls.__name__}`" in table, cls


def _commands() -> list[list[str]]:
    """The memzoo command lines of the README's bash blocks (comments dropped, continuations joined)."""
    import shlex

    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv[:2] == ["accelerate", "launch"] or "memzoo" in " ".join(argv[:3]):
                commands.append(argv)
    return commands


COMMANDS = _commands()


def test_readme_has_commands():
    assert any(c[:3] == ["python", "-m", "memzoo.train"] for c in COMMANDS)
    assert any(c[:1] == ["memzoo-bench"] for c in COMMANDS) and any(c[:1] == ["accelerate"] for c in COMMANDS)


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(c)[:60] for c in COMMANDS])
def test_readme_commands_parse(argv):
    """Every memzoo-train / memzoo-bench command resolves to a valid config (presets, keys, values, grids), and
    every launch config it names exists; nothing is trained."""
    from memzoo.eval.cli import _parser, build_config
    from memzoo.train.cli import parse_train_args

    if argv[:2] == ["accelerate", "launch"]:
        config = argv[argv.index("--config_file") + 1]
        assert (README.parent / config).is_file(), config
        argv = ["python", *argv[argv.index("-m"):]]
    if argv[0] == "python":
        argv = argv[1:]
    tool, args = ({"memzoo-train": "memzoo.train", "memzoo-bench": "memzoo.eval"}.get(argv[0]), argv[1:]) \
        if not argv[0].startswith("-") else (argv[1], argv[2:])
    if tool == "memzoo.train" and args[:1] not in (["plot"], ["presets"]):
        parse_train_args(args)
    elif tool == "memzoo.eval" and args[:1] != ["memorize"]:
        build_config(_parser().parse_args(args))
    else:
        assert tool in ("memzoo", "memzoo.train", "memzoo.eval", "memzoo.kernels.aot"), argv


def test_readme_links_exist():
    for target in re.findall(r"\]\(((?:docs|examples|benchmarks)/[^)#]+)", README.read_text()):
        assert (README.parent / target).exists(), target


def _recorded() -> dict:
    """The newest ``benchmarks/readme_numbers.py`` row of each command."""
    import json

    rows = {}
    for path in sorted((README.parent / "benchmarks" / "results").glob("readme-numbers-*.json")):
        for row in json.loads(path.read_text())["rows"]:
            rows[row["name"]] = row
    return rows


def _about(seconds: float) -> str:
    return f"{round(seconds)} s" if seconds < 90 else f"{round(seconds / 60)} min"


def test_quoted_times_and_scores_are_the_recorded_measurements():
    """Re-measuring (benchmarks/readme_numbers.py --save) without updating the README and docs fails here."""
    rows = _recorded()
    readme = README.read_text()
    docs = (README.parent / "docs" / "benchmarks.md").read_text()
    training = (README.parent / "docs" / "training.md").read_text()
    mqar, niah, tiny = rows["mqar-ci"], rows["niah-ci"], rows["train-tiny"]
    assert f"`examples/quickstart.py` (about {_about(rows['quickstart']['cpu_s'])} of CPU time)" in readme
    assert f"From Python (about {_about(rows['readme-build-model']['cpu_s'])} of CPU time" in readme
    assert (f"(accuracy {mqar['accuracy']} after {mqar['steps']} steps, about {_about(mqar['cpu_s'])} of CPU "
            "time)") in readme
    assert f"in about {_about(tiny['cpu_s'])} of CPU time:" in readme
    assert f"about {_about(tiny['cpu_s'])} of CPU time" in training
    assert f"# {_about(mqar['cpu_s'])} of CPU time (one thread): attention reaches {mqar['accuracy']}" in docs
    assert (f"8 epochs ({niah['steps']} steps, {_about(niah['cpu_s'])} of CPU time) end at "
            f"{niah['exact_match']:.0%} exact match, {niah['accuracy']:.2f} token accuracy") in docs
