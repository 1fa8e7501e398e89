"""The pipeline runs one way: the four stages talk through files only, so no top-level module imports a stage, and the
modules' imports form no circle. Read from the source with ast; an import inside a function counts too."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"sample_votes", "build_pseudolabels", "grpo_train", "evaluate"}


def imported(source: str) -> set[str]:
    """The top-level names of every module the source imports, wherever the import statement is."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def import_graph() -> dict[str, set[str]]:
    """Each top-level module -> the top-level modules it imports."""
    modules = {path.stem: path for path in ROOT.glob("*.py")}
    return {name: imported(path.read_text(encoding="utf-8")) & set(modules) - {name} for name, path in modules.items()}


def test_the_parser_sees_every_import_form():
    source = "import common\nfrom votes import read_votes\ndef f():\n    import build_pseudolabels as bp\n"
    assert imported(source) == {"common", "votes", "build_pseudolabels"}


def test_no_module_imports_a_stage_and_no_import_circle():
    graph = import_graph()
    assert STAGES <= set(graph) and graph["sample_votes"] >= {"common", "votes"}
    arrows = sorted((name, stage) for name, deps in graph.items() for stage in deps & STAGES)
    assert arrows == [], f"imports of a stage (they must talk through files): {arrows}"
    done: set[str] = set()
    while len(done) < len(graph):  # peel off the modules whose imports are all done; a circle never peels
        ready = {name for name, deps in graph.items() if name not in done and deps <= done}
        assert ready, f"an import circle among {sorted(set(graph) - done)}"
        done |= ready
