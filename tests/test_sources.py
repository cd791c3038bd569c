"""Every Python file of the project passes pyflakes: no unused import or variable, no undefined
name, no redefinition: dead imports and typos in rarely run paths fail CI."""
from __future__ import annotations

import io

from pyflakes.api import checkRecursive
from pyflakes.reporter import Reporter

from modules import REPO

CHECKED = ("annotate", "wgan", "configs", "scripts", "tests")


def test_every_source_passes_pyflakes():
    messages = io.StringIO()
    count = checkRecursive([str(REPO / folder) for folder in CHECKED],
                           Reporter(messages, messages))
    assert count == 0, messages.getvalue()


def test_pyflakes_reports_an_unused_import(tmp_path):
    """The check above can fail: pyflakes counts an unused import in a file of its own."""
    (tmp_path / "module.py").write_text("import os\n")
    messages = io.StringIO()
    assert checkRecursive([str(tmp_path)], Reporter(messages, messages)) == 1
    assert "'os' imported but unused" in messages.getvalue()
