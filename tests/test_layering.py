"""The house's floors, read from the code itself: every `ptqd` import (module level or inside a
function) goes to the same or a lower layer, no import cycle anywhere, and the runtime (what
the Triton models ship) needs numpy, onnxruntime and `tokenizers` at most."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

PACKAGE = Path(__file__).resolve().parents[1] / "ptqd"

# Lowest first. A module belongs to the entry with the longest matching prefix.
LAYERS = [
    ("errors", ("ptqd.errors",)),
    ("runtime", ("ptqd.runtime",)),
    # what the torch-side stages share: the package marker, file writing, quantization math,
    # the model families, the model and its conditioning, diffusers' DDIM timeline, the built-in
    # models, images
    ("base", ("ptqd", "ptqd.output", "ptqd.memory", "ptqd.quant_math", "ptqd.families", "ptqd.model",
              "ptqd.conditions", "ptqd.condition_options", "ptqd.ddim", "ptqd.devices", "ptqd.builtin",
              "ptqd.images")),
    ("calibration", ("ptqd.calibration",)),
    ("exporter", ("ptqd.exporter",)),
    ("engines", ("ptqd.engines",)),
    ("deploy", ("ptqd.deploy",)),
    ("top", ("ptqd.sample", "ptqd.evaluation", "ptqd.resume", "ptqd.pipeline", "ptqd.verify", "ptqd.cli",
             "ptqd.__main__")),
]
RUNTIME_THIRD_PARTY = {"numpy", "onnxruntime", "tokenizers"}
# the model.py files Triton's Python backend runs beside a copy of the runtime
TRITON_MODELS = "ptqd.deploy.triton_models"


def module_files(root: Path) -> dict[str, Path]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_package(modules: dict[str, Path], name: str) -> bool:
    return name in modules and modules[name].name == "__init__.py"


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported module, line) for every import in the file, resolved against `modules`;
    names outside ptqd are returned as their top-level package."""
    package = name if _is_package(modules, name) else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub if sub in modules else base, node.lineno))
    resolved = [(m if m.split(".")[0] == "ptqd" else m.split(".")[0], line) for m, line in found]
    return list(dict.fromkeys(resolved))


def layer_of(module: str) -> int | None:
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    return best


def import_graph(root: Path = PACKAGE) -> dict[str, list[tuple[str, int]]]:
    modules = module_files(root)
    return {name: [(m, line) for m, line in imports_of(name, path, modules) if m.startswith("ptqd")]
            for name, path in modules.items()}


def upward_imports(graph) -> list[str]:
    problems = []
    for module, deps in sorted(graph.items()):
        own = layer_of(module)
        if own is None:
            problems.append(f"{module}: in no layer (add it to LAYERS in tests/test_layering.py)")
            continue
        for dep, line in deps:
            if layer_of(dep) is not None and layer_of(dep) > own:
                problems.append(f"{module}:{line} imports {dep} "
                                f"({LAYERS[own][0]} -> {LAYERS[layer_of(dep)][0]}: upward)")
    return problems


def import_cycles(graph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each as a cycle
    through its modules in import order."""
    edges = {m: sorted({d for d, _ in deps if d in graph and d != m}) for m, deps in graph.items()}
    index, low, stack, on_stack, comps = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(_cycle_through(sorted(comp), edges))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return comps


def _cycle_through(comp: list[str], edges) -> list[str]:
    """One cycle inside a strongly connected component, from its first module back to it."""
    members, start = set(comp), comp[0]
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in edges[v]:
                if w == start:
                    return paths[v] + [start]
                if w in members and w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    return comp


def test_imports_go_downward_only():
    assert upward_imports(import_graph()) == []


def test_no_import_cycle():
    cycles = import_cycles(import_graph())
    assert cycles == [], "; ".join(" -> ".join(c) for c in cycles)


def test_runtime_needs_numpy_onnxruntime_and_tokenizers_at_most():
    modules = module_files(PACKAGE)
    bad = []
    for name, path in modules.items():
        if layer_of(name) != 1 and not name.startswith(TRITON_MODELS + "."):
            continue
        for dep, line in imports_of(name, path, modules):
            if dep.startswith("ptqd"):
                ok = dep == "ptqd.errors" or dep == "ptqd.runtime" or dep.startswith("ptqd.runtime.")
            else:
                ok = dep in sys.stdlib_module_names or dep in RUNTIME_THIRD_PARTY or (
                    dep == "triton_python_backend_utils" and name.startswith(TRITON_MODELS))
            if not ok:
                bad.append(f"{name}:{line} imports {dep}")
    assert bad == []


def test_the_layering_check_names_what_breaks_it(tmp_path):
    """The checks above would catch an upward import and a cycle, and name them."""
    root = tmp_path / "ptqd"
    for rel, text in {"__init__.py": "", "errors.py": "", "runtime/__init__.py": "",
                      "runtime/a.py": "from ptqd.calibration.b import X\n",
                      "calibration/__init__.py": "",
                      "calibration/b.py": "from . import c\nX = 1\n",
                      "calibration/c.py": "def f():\n    from ptqd.calibration.b import X\n"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    graph = import_graph(root)
    assert upward_imports(graph) == ["ptqd.runtime.a:1 imports ptqd.calibration.b (runtime -> calibration: upward)"]
    assert import_cycles(graph) == [["ptqd.calibration.b", "ptqd.calibration.c", "ptqd.calibration.b"]]


BLOCKED = ("torch", "onnx", "diffusers", "transformers", "safetensors", "click", "tqdm", "sklearn",
           "matplotlib", "PIL", "scipy")

ISOLATED = textwrap.dedent('''
    import importlib, json, pkgutil, sys
    from pathlib import Path

    BLOCKED = set(json.loads(sys.argv[1]))

    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is not importable here")

    sys.meta_path.insert(0, Refuse())
    import numpy as np
    import ptqd.runtime
    for info in pkgutil.iter_modules(ptqd.runtime.__path__):
        importlib.import_module(f"ptqd.runtime.{info.name}")
    from ptqd.runtime.layout import SCHEDULER_DIR, ONNX_DIR, graph_path
    from ptqd.runtime.onnxruntime import OnnxRuntimeUNet
    from ptqd.runtime.sampler import Sampler
    from ptqd.runtime.schedule import FoldedSchedule

    out = Path(sys.argv[2])
    schedule = FoldedSchedule.load(out / SCHEDULER_DIR)
    schedule.steps = schedule.steps[:3]
    engines = {c: OnnxRuntimeUNet(graph_path(out / ONNX_DIR, c, "cpu-fast")) for c in schedule.configs}
    np.save(sys.argv[3], Sampler(schedule, engines, batch_size=2).generate(3, seed=7))
    print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED or m == "onnx")))
''')


def test_runtime_runs_folded_steps_where_torch_and_onnx_cannot_be_imported(exported, tmp_path):
    from ptqd.runtime.layout import ONNX_DIR, SCHEDULER_DIR, graph_path
    from ptqd.runtime.onnxruntime import OnnxRuntimeUNet
    from ptqd.runtime.sampler import Sampler
    from ptqd.runtime.schedule import FoldedSchedule

    result = subprocess.run([sys.executable, "-c", ISOLATED, json.dumps(BLOCKED), str(exported),
                             str(tmp_path / "x.npy")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
    # the same three folded steps in this process, torch loaded, give the same images
    schedule = FoldedSchedule.load(exported / SCHEDULER_DIR)
    schedule.steps = schedule.steps[:3]
    engines = {c: OnnxRuntimeUNet(graph_path(exported / ONNX_DIR, c, "cpu-fast")) for c in schedule.configs}
    expected = Sampler(schedule, engines, batch_size=2).generate(3, seed=7)
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), expected)


def test_triton_repository_ships_the_runtime_whole(exported):
    version = exported / "triton" / "ptqd_sampler" / "1" / "ptqd"
    shipped = sorted(p.relative_to(version).as_posix() for p in version.rglob("*.py"))
    expected = ["__init__.py", "errors.py"] + sorted(f"runtime/{p.name}" for p in (PACKAGE / "runtime").glob("*.py"))
    assert shipped == sorted(expected)
    for rel in shipped:
        assert (version / rel).read_bytes() == (PACKAGE / rel).read_bytes(), rel
