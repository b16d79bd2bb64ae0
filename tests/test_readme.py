"""Every README code block runs as written: the ```python blocks, in order, in one namespace."""

import pathlib
import re

README = pathlib.Path(__file__).parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 4


def test_readme_blocks_run_in_order(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}
    for i, block in enumerate(BLOCKS):
        exec(compile(block, f"README.md block {i}", "exec"), namespace)
    assert namespace["state"] is not None and "rows" in namespace
    assert "0.001" in capsys.readouterr().out  # the sweep block prints its rows
