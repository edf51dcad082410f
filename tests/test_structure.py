"""The shape of the code: no import cycles among helpers/, and every step and file name written once, in steps.py."""

import ast
import json
import re
from pathlib import Path

from helpers import steps
from helpers.runfolder import Step

ROOT = Path(steps.__file__).resolve().parent.parent
HELPERS = ROOT / "helpers"


def helper_imports(path: Path) -> set[str]:
    """The helpers modules a file imports, at the top or inside a function (a lazy import still ties the two)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith("helpers."):
                found.add(node.module.split(".")[1])
            elif node.module == "helpers":
                found.update(a.name for a in node.names if (HELPERS / f"{a.name}.py").is_file())
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("helpers."))
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [node, nxt] if nxt in path else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, node])):
                return cycle
        state[node] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module, [])):
            return cycle
    return None


def test_find_cycle_sees_a_lazy_two_module_cycle_and_passes_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"a"}}) is not None
    assert find_cycle({"x": {"a"}, "a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None


def test_no_import_cycle_among_helpers():
    graph = {p.stem: helper_imports(p) - {p.stem} for p in HELPERS.glob("*.py") if p.stem != "__init__"}
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph) or [])}"


def _declared_names() -> tuple[set[str], set[str]]:
    """Step folder names, and the file and folder names steps write (the module's upper-case strings)."""
    declared = [v for v in vars(steps).values() if isinstance(v, Step)]
    files = {v for k, v in vars(steps).items() if k.isupper() and isinstance(v, str)}
    files |= {steps.gguf_name(t) for t in ("f16", "q8_0", "bf16", "f32")}
    return {s.name for s in declared}, files


def _sources() -> dict[str, str]:
    """Every helper, test, benchmark and tool, and every notebook's code cells (its words may name files)."""
    texts = {}
    for folder in ("helpers", "tests", "benchmarks", "tools"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.resolve() not in (Path(steps.__file__).resolve(), Path(__file__).resolve()):
                texts[str(path.relative_to(ROOT))] = path.read_text(encoding="utf-8")
    for path in (ROOT / "notebooks").glob("*.ipynb"):
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        texts[str(path.relative_to(ROOT))] = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    return texts


def spelled(name: str, text: str, anywhere: bool) -> bool:
    """A quoted `name` in code: as a whole string or a path's first part; names without a dot (a folder such as
    "merged", which is also a word) only where they are a path: after `/ ` or before `/`."""
    quoted = re.compile(rf"""(["']){re.escape(name)}(\1|/)""")
    as_path = re.compile(rf"""/\s*(["']){re.escape(name)}\1|(["']){re.escape(name)}/""")
    return bool((quoted if anywhere else as_path).search(text))


def test_no_step_or_file_name_outside_steps_py():
    step_names, files = _declared_names()
    found = []
    for where, text in _sources().items():
        found += [f"{where}: step {n!r}" for n in step_names if spelled(n, text, anywhere=True)]
        found += [f"{where}: file {n!r}" for n in files if spelled(n, text, anywhere="." in n or n[0].isupper())]
    assert not found, "use the names in helpers/steps.py:\n" + "\n".join(sorted(found))


def test_the_name_check_would_see_a_spelled_name():
    assert spelled("05_train", 'run.require("05_train")', anywhere=True)
    assert spelled("report.md", "out / 'report.md'", anywhere=True)
    assert spelled("merged", 'work / "merged"', anywhere=False)
    assert not spelled("merged", '{"merged": 1.0}', anywhere=False)
