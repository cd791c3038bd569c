"""The layout's one rule (README, "Layout"): a lower room never imports a higher one. Every import
statement of every module, function-local ones included, is read with `ast`."""
from __future__ import annotations

import ast

import pytest

from modules import REPO

# rank of each room, lowest first; a module may import its own rank or a lower one
ROOMS = [
    ("annotate.data", "annotate.models", "annotate.losses", "annotate.metrics", "annotate.devices",
     "annotate.workdir", "annotate.training_log"),
    ("annotate.config", "annotate.convert", "annotate.checkpoints", "annotate.run_data"),
    ("annotate.train",),
    ("annotate.reports",),
    ("annotate.main", "annotate.predict", "annotate.summarize", "annotate.cli"),
    ("wgan",),
]


def rank(module: str) -> int:
    """The rank of `module` (a dotted name) from the longest room prefix it falls under."""
    matches = [(len(room), number) for number, rooms in enumerate(ROOMS) for room in rooms
               if module == room or module.startswith(room + ".")]
    if not matches:
        raise KeyError(f"{module} is in no room of ROOMS: add it")
    return max(matches)[1]


def module_name(path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(module: str, source: str, is_package: bool = False) -> list[str]:
    """The project modules that `source` (the text of `module`, a package's __init__ when
    `is_package`) imports anywhere, relative imports resolved."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            origin = ".".join(base + ([node.module] if node.module else []))
            # `from annotate import data` imports annotate.data; `from x.y import f`, x.y
            names += [f"{origin}.{alias.name}" if origin in ("annotate", "wgan") else origin
                      for alias in node.names]
    return [name for name in names if name.split(".")[0] in ("annotate", "wgan")]


SOURCES = sorted([*(REPO / "annotate").rglob("*.py"), *(REPO / "wgan").rglob("*.py")])


def test_relative_imports_are_resolved():
    source = "from . import train\nfrom .data import folder\nfrom annotate import reports\n"
    assert imported_modules("annotate.metrics", source) == [
        "annotate.train", "annotate.data", "annotate.reports"]
    assert imported_modules("annotate.data", "from .. import train\n", is_package=True) == [
        "annotate.train"]


def test_rank_reads_the_longest_room():
    assert rank("annotate.data.fetch") == 0 and rank("annotate.train") == 2
    assert rank("wgan.run") == 5 and rank("annotate.main") == 4
    with pytest.raises(KeyError, match="annotate.nowhere is in no room"):
        rank("annotate.nowhere")


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: module_name(path))
def test_no_module_imports_a_higher_room(path):
    module = module_name(path)
    if module in ("annotate", "wgan"):
        return  # the packages' own __init__ files hold no code
    imports = imported_modules(module, path.read_text(), path.name == "__init__.py")
    higher = [name for name in imports if rank(name) > rank(module)]
    assert not higher, f"{module} (room {rank(module)}) imports {higher}"
