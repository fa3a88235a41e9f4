"""Imports flow one way through ``src/fastxlstm``, without cycles, and no source file is too long.

Every ``import`` / ``from ... import`` statement of every module is read with :mod:`ast` -- at module level,
inside functions, under ``if TYPE_CHECKING:``, relative or absolute -- and resolved to the module it names
(``from pkg import name`` names the module ``pkg.name`` where that is a file, else ``pkg`` itself). Three
checks over that graph:

- no cycle between modules, and none between packages (a module belongs to the package whose directory
  holds it, ``fastxlstm.ops`` and ``fastxlstm.ops.triton`` being two; a module right below the root, such as
  ``fastxlstm/checkpoint.py``, counts as a package of its own);
- every import goes to the importer's own component or to a lower level of :data:`LAYERS`;
- no file under ``src/`` is longer than :data:`MAX_LINES` lines.

The layers, lowest first (a component is the first name below ``fastxlstm``; a module may import its own
level and lower ones, never a higher one; imports within one level are kept one-way by the cycle checks):

0. base utilities, torch and the standard library only: ``config`` (the model config), ``devices`` (the one
   device / dtype parser), ``extras`` (optional dependencies), ``state`` (the recurrent-state type),
   ``sampling`` (``SamplingParams``), ``text`` (stop strings), ``tokenizer``;
1. ``ops`` (the mLSTM kernels: reference and Triton), and ``options`` (the CLI's shared options, console and
   ``fail``: at ops' level, since it uses ``ops.quant``'s parser; every command module imports it);
2. ``model`` (the readable reference model; it writes its own checkpoints, ``model.hf_layout``);
3. ``checkpoint`` (loading builds models, so it sits on top of ``model``);
4. ``engine`` (the inference core: runner, sampler, slots, ``LLM``);
5. ``serving`` (the OpenAI server over the engine);
6. ``training``, ``bench`` (training and benchmarks; training reuses the server's chat template);
7. ``eval`` (perplexity and lm-eval; it reuses training's data and evaluation);
8. ``cli`` (the ``fastxlstm`` command: it registers every sub-command), ``chat`` (its REPL), and the package
   root ``fastxlstm/__init__.py`` (the public facade; ``cli`` reads ``__version__`` from it);
9. ``train``, ``__main__`` (entry points).

Dynamic imports (``importlib.import_module``) are not seen; the one the package has is
``serving/__init__``'s lazy attribute lookup of its own submodules.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = "fastxlstm"
MAX_LINES = 500
ROOT_KEY = ""  # the component of the package root module ``fastxlstm`` itself

LAYERS: dict[str, int] = {
    "config": 0, "devices": 0, "extras": 0, "state": 0, "sampling": 0, "text": 0, "tokenizer": 0,
    "ops": 1, "options": 1,
    "model": 2,
    "checkpoint": 3,
    "engine": 4,
    "serving": 5,
    "training": 6, "bench": 6,
    "eval": 7,
    "cli": 8, "chat": 8, ROOT_KEY: 8,
    "train": 9, "__main__": 9,
}


@dataclass
class Module:
    name: str  # dotted
    path: Path
    rel: str  # the path below src/, for messages
    is_package: bool  # an __init__.py
    imports: list[tuple[str, int]] = field(default_factory=list)  # (module imported, line)

    @property
    def package(self) -> str:
        return self.name if self.is_package else self.name.rpartition(".")[0]

    @property
    def unit(self) -> str:
        """What the package-cycle check counts as one package: the package whose directory holds the module,
        except that a module right below the root (``fastxlstm/config.py``) is a unit of its own."""
        return self.name if self.package == ROOT else self.package

    @property
    def component(self) -> str:
        parts = self.name.split(".")
        return parts[1] if len(parts) > 1 else ROOT_KEY


def read_tree(src: Path, root: str = ROOT) -> dict[str, Module]:
    """Every module below ``src/root`` with the in-package modules it imports."""
    mods: dict[str, Module] = {}
    for path in sorted((src / root).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        mods[".".join(parts)] = Module(".".join(parts), path, str(path.relative_to(src)), is_package)

    def resolve(name: str) -> str | None:  # the longest prefix that is a module of ours
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    for mod in mods.values():
        tree = ast.parse(mod.path.read_text(), str(mod.path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base_parts = mod.package.split(".")
                    if node.level - 1 >= len(base_parts):
                        raise AssertionError(f"{mod.path}:{node.lineno}: relative import above the package root")
                    base = ".".join(base_parts[: len(base_parts) - (node.level - 1)]
                                    + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for name in names:
                if name.split(".")[0] != root:
                    continue
                target = resolve(name)
                if target is not None and target != mod.name and (target, node.lineno) not in mod.imports:
                    mod.imports.append((target, node.lineno))
    return mods


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # recursion depth is bounded by the number of modules (~150)
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                out.append(sorted(scc))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(out)


def where(mods: dict[str, Module], group: list[str], key) -> list[str]:
    """The import statements that make up a cycle among ``group`` (names under ``key``)."""
    inside = set(group)
    return [f"{m.rel}:{line} imports {t}" for m in mods.values() if key(m.name) in inside
            for t, line in m.imports if key(t) in inside and key(t) != key(m.name)]


def module_cycles(mods: dict[str, Module]) -> list[str]:
    found = cycles({m.name: {t for t, _ in m.imports} for m in mods.values()})
    return [f"{' <-> '.join(c)}: " + "; ".join(where(mods, c, lambda n: n)) for c in found]


def package_cycles(mods: dict[str, Module]) -> list[str]:
    pkg = {m.name: m.unit for m in mods.values()}
    edges: dict[str, set[str]] = {}
    for m in mods.values():
        edges.setdefault(m.unit, set()).update(pkg[t] for t, _ in m.imports if pkg[t] != m.unit)
    return [f"{' <-> '.join(c)}: " + "; ".join(where(mods, c, pkg.__getitem__)) for c in cycles(edges)]


def upward_imports(mods: dict[str, Module], layers: dict[str, int] = LAYERS) -> list[str]:
    bad = []
    for m in mods.values():
        if m.component not in layers:
            bad.append(f"{m.name}: component {m.component!r} has no layer in LAYERS (add it)")
            continue
        for t, line in m.imports:
            tc = mods[t].component
            if tc != m.component and layers.get(tc, len(layers)) > layers[m.component]:
                bad.append(f"{m.rel}:{line} {m.name} (layer {layers[m.component]}) imports {t} "
                           f"(layer {layers.get(tc)})")
    return bad


def long_files(mods: dict[str, Module], limit: int = MAX_LINES) -> list[str]:
    return [f"{m.name}: {n} lines" for m in mods.values() if (n := len(m.path.read_text().splitlines())) > limit]


# ------------------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def tree() -> dict[str, Module]:
    return read_tree(SRC)


def test_no_import_cycles_between_modules(tree):
    assert module_cycles(tree) == []


def test_no_import_cycles_between_packages(tree):
    assert package_cycles(tree) == []


def test_imports_flow_down_the_layers(tree):
    assert upward_imports(tree) == []


def test_no_source_file_over_the_limit(tree):
    assert long_files(tree) == []


def test_the_checks_see_function_level_relative_and_absolute_imports(tmp_path):
    """The checks over a small tree with one of each fault: an upward import inside a function, a module
    cycle through a relative ``from . import``, a package cycle through absolute imports, a long file."""
    files = {
        "__init__.py": "",
        "config.py": "X = 1\n",
        "model/__init__.py": "from .xlstm import M\n",
        "model/xlstm.py": "from ..config import X\n\ndef save():\n    from ..engine.llm import LLM\n",
        "engine/__init__.py": "",
        "engine/llm.py": "import fastxlstm.model.xlstm\nfrom . import runner\n",
        "engine/runner.py": "from fastxlstm.engine import llm\n",
        "serving/__init__.py": "",
        "serving/app.py": "from fastxlstm.serving.sub import a\n" + "x = 1\n" * 600,
        "serving/sub/__init__.py": "",
        "serving/sub/a.py": "from ..app import x\n",
    }
    for rel, text in files.items():
        p = tmp_path / "fastxlstm" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    mods = read_tree(tmp_path)
    assert ("fastxlstm.engine.llm", 4) in mods["fastxlstm.model.xlstm"].imports  # function level, relative
    assert ("fastxlstm.config", 1) in mods["fastxlstm.model.xlstm"].imports
    assert ("fastxlstm.engine.runner", 2) in mods["fastxlstm.engine.llm"].imports  # `from . import runner`
    up = upward_imports(mods)
    assert len(up) == 1 and "fastxlstm.model.xlstm (layer 2) imports fastxlstm.engine.llm (layer 4)" in up[0]
    mc = module_cycles(mods)
    assert [c.split(":")[0] for c in mc] == [
        "fastxlstm.engine.llm <-> fastxlstm.engine.runner <-> fastxlstm.model.xlstm",  # llm -> xlstm -> llm too
        "fastxlstm.serving.app <-> fastxlstm.serving.sub.a"], mc
    pc = package_cycles(mods)
    assert [c.split(":")[0] for c in pc] == ["fastxlstm.engine <-> fastxlstm.model",
                                             "fastxlstm.serving <-> fastxlstm.serving.sub"], pc
    assert long_files(mods) == ["fastxlstm.serving.app: 601 lines"]
    # the table is what decides: with model above the engine, the engine's import of it is the upward one
    assert [u.split(" (")[0] for u in upward_imports(mods, {**LAYERS, "model": 5})] == [
        "fastxlstm/engine/llm.py:1 fastxlstm.engine.llm"]
