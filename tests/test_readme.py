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
    for wrapper in ("HMT", "LongMem", "DiscreteKVBottleneck"):
        assert f"`{wrapper}`" in table, wrapper
