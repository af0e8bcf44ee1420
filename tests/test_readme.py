"""The README's Python API section runs as written (in a fresh folder that sees the repo's ``standins/``)."""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_python_api_section_runs_as_written(tmp_path):
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert blocks, "the Python API section has no python block"
    (tmp_path / "standins").symlink_to(REPO / "standins")
    (tmp_path / "example.py").write_text("\n".join(blocks))
    p = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip(), "the example prints generated text"
