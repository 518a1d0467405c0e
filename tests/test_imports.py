"""gpt2kit's modules depend on each other one way (see docs/architecture.md): no import cycles, and an import
inside a function only with a reason.

The imports are read from the source with `ast`, not by importing anything, and every import counts: a
module's top level, function bodies (a lazy import is still a dependency, and still a cycle when it closes
one; laziness only decides *when* the module is loaded), class bodies and `try:` blocks. Only imports
under `if TYPE_CHECKING:`, which never run, make no edge.
Importing `gpt2kit.a.b` from outside the package `gpt2kit.a` also runs `gpt2kit/a/__init__.py`, so it is an
edge to `gpt2kit.a` too."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = "gpt2kit"

# Function-body imports that need no `# lazy:` reason: optional extras (pyproject's [server], [plot],
# [tensorboard], [gguf], [wandb], [ctranslate2], [lmeval]) that a core install lacks.
OPTIONAL_PACKAGES = {"fastapi", "uvicorn", "starlette", "pydantic", "matplotlib", "tensorboard", "gguf", "wandb",
                     "ctranslate2", "transformers", "lm_eval", "torch.utils.tensorboard"}

# Files that other parts of issue 19 are rewriting at the same time as this test was written (the trainer,
# the model, generation, the server): their function-body imports are checked once those parts are merged.
# Remove an entry as soon as its file obeys the rule; nothing may be added here.
PENDING_LAZY_REASONS: set[str] = set()
# Import edges that close a cycle through a file another part is rewriting, each with how it goes away.
# Remove an entry once it is gone; nothing may be added here.
PENDING_CYCLE_EDGES: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class Import:
    importer: str  # module name
    target: str  # the gpt2kit module it loads, or the external name as written
    line: int
    in_function: bool
    text: str  # the source line(s), for the lazy-reason check and messages


def _modules() -> dict[str, tuple[Path, bool]]:
    """module name -> (file, is a package's __init__)."""
    out = {}
    for f in sorted((SRC / ROOT).rglob("*.py")):
        parts = list(f.relative_to(SRC).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)
    return out


MODULES = _modules()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _targets(module: str, is_pkg: bool, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The modules an import statement names: gpt2kit modules by their full name, others as written."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            base = module.split(".") if is_pkg else module.split(".")[:-1]
            base = base[:len(base) - (node.level - 1)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        # `from pkg import sub` imports the submodule sub; `from mod import name` imports mod
        names = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in MODULES else prefix for a in node.names]
    out = []
    for n in names:
        if n == ROOT or n.startswith(ROOT + "."):
            while n not in MODULES:
                n = n.rpartition(".")[0]
        out.append(n)
    return list(dict.fromkeys(out))


def _imports(module: str) -> Iterator[Import]:
    path, is_pkg = MODULES[module]
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines()

    def walk(node: ast.AST, in_function: bool) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                yield from (i for c in child.orelse for i in walk_one(c, in_function))
                continue
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield from walk(child, True)
                continue
            yield from walk_one(child, in_function)

    def walk_one(child: ast.AST, in_function: bool) -> Iterator[Import]:
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            text = "\n".join(lines[child.lineno - 2 if child.lineno > 1 else 0:child.end_lineno])
            for t in _targets(module, is_pkg, child):
                yield Import(module, t, child.lineno, in_function, text)
        else:
            yield from walk(child, in_function)

    tree = ast.parse(source)
    yield from walk(tree, False)


ALL_IMPORTS = [i for m in MODULES for i in _imports(m)]


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for i in ALL_IMPORTS:
        if i.target not in MODULES or i.target == i.importer or (i.importer, i.target) in PENDING_CYCLE_EDGES:
            continue
        graph[i.importer].add(i.target)
        # the packages above the target that the importer is not inside of run their __init__ first
        parts = i.target.split(".")
        for k in range(2, len(parts)):
            pkg = ".".join(parts[:k])
            if not (i.importer == pkg or i.importer.startswith(pkg + ".")):
                graph[i.importer].add(pkg)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path that returns to its start) per strongly connected component that has one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
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
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    cycles = []
    for comp in components:  # a shortest way around from the component's first module
        members, start = set(comp), comp[0]
        prev: dict[str, str] = {}
        frontier, seen = [start], {start}
        found = None
        while frontier and found is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & members):
                    if w == start:
                        found = v
                        break
                    if w not in seen:
                        seen.add(w)
                        prev[w] = v
                        nxt.append(w)
                if found is not None:
                    break
            frontier = nxt
        path = [found]
        while path[-1] != start:
            path.append(prev[path[-1]])
        cycles.append(path[::-1] + [start])
    return cycles


def _where(a: str, b: str) -> str:
    """The import lines that make the edge a -> b."""
    hits = [i for i in ALL_IMPORTS if i.importer == a and (i.target == b or i.target.startswith(b + "."))]
    return ", ".join(f"{MODULES[a][0].relative_to(SRC)}:{i.line}" + (" (in a function)" if i.in_function else "")
                     for i in hits)


def test_the_walker_sees_top_level_and_function_body_imports():
    graph = _graph()
    assert "gpt2kit.errors" in graph["gpt2kit.config"]
    assert "gpt2kit.checkpoints" in graph["gpt2kit.checkpoints.hub"] or \
        "gpt2kit.checkpoints.hf" in graph["gpt2kit.checkpoints.hub"]
    lazy = [i for i in ALL_IMPORTS if i.importer == "gpt2kit.checkpoints" and i.in_function]
    assert any(i.target == "gpt2kit.checkpoints.hub" for i in lazy)  # resolve_model_dir's Hub download
    # importing a submodule from outside its package runs the package's __init__ first
    assert {"gpt2kit.checkpoints.hub", "gpt2kit.checkpoints"} <= graph["gpt2kit.push"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_there_are_no_import_cycles():
    graph = _graph()
    cycles = _cycles(graph)
    msg = "\n".join(" -> ".join(c) + "\n    " + "\n    ".join(f"{a} -> {b}: {_where(a, b)}"
                                                             for a, b in zip(c, c[1:]))
                    for c in cycles)
    assert not cycles, "import cycles (each edge with the lines that make it):\n" + msg


def test_lower_layers_never_import_higher_ones():
    """The bottom of the stack stays light: file layout and config need neither torch nor the model."""
    graph = _graph()

    def reach(m: str) -> set[str]:
        seen, todo = set(), [m]
        while todo:
            for w in graph[todo.pop()]:
                if w not in seen:
                    seen.add(w)
                    todo.append(w)
        return seen
    assert reach("gpt2kit.layout") <= {"gpt2kit", "gpt2kit.errors", "gpt2kit.config"}
    assert reach("gpt2kit.config") <= {"gpt2kit", "gpt2kit.errors", "gpt2kit.layout", "gpt2kit.config"}
    torch_free = ("gpt2kit.layout", "gpt2kit.config", "gpt2kit.runs", "gpt2kit.run_numbers")
    for m in torch_free:
        for dep in reach(m) | {m}:
            top = [i.target for i in ALL_IMPORTS if i.importer == dep and not i.in_function]
            assert "torch" not in top and not any(t.startswith("torch.") for t in top), (m, dep)
    for low in ("gpt2kit.config", "gpt2kit.tokenizer", "gpt2kit.model", "gpt2kit.lora", "gpt2kit.runs"):
        assert not reach(low) & {"gpt2kit.checkpoints", "gpt2kit.train", "gpt2kit.generate", "gpt2kit.server",
                                 "gpt2kit.cli", "gpt2kit.data"}, low


def _lazy_without_reason() -> list[str]:
    out = []
    for i in ALL_IMPORTS:
        rel = str(MODULES[i.importer][0].relative_to(SRC))
        if not i.in_function or rel.startswith("gpt2kit/cli/"):
            continue
        if any(i.target == p or i.target.startswith(p + ".") for p in OPTIONAL_PACKAGES):
            continue
        if "# lazy:" in i.text:
            continue
        out.append(f"{rel}:{i.line}: {i.target}")
    return sorted(set(out))


def test_every_function_body_import_says_why():
    """Outside the CLI (whose verbs import what they run, so `gpt2kit --help` stays fast), an import inside a
    function keeps torch or a slow or optional dependency off a start-up path, and its line (or the line
    above) says which with `# lazy: <why>`; optional extras need no comment."""
    missing = [x for x in _lazy_without_reason() if x.split(":")[0] not in PENDING_LAZY_REASONS]
    assert not missing, "function-body imports without a `# lazy: <why>` comment:\n" + "\n".join(missing)


def test_the_bottom_layers_and_the_cli_parser_load_without_torch():
    import subprocess
    import sys
    code = ("import sys\n"
            "import gpt2kit.config, gpt2kit.layout, gpt2kit.runs, gpt2kit.run_numbers, gpt2kit.cli.convert\n"
            "from gpt2kit.config import GPTConfig\n"
            "GPTConfig.from_json_file(sys.argv[1])\n"  # wording its errors asks layout, not the HF reader
            "print(sorted(m for m in ('torch', 'gpt2kit.model', 'gpt2kit.checkpoints') if m in sys.modules))\n")
    cfg = Path(__file__).resolve().parent / "_imports_config.json"
    try:
        cfg.write_text('{"n_layer": 2, "n_head": 2, "n_embd": 8}')
        r = subprocess.run([sys.executable, "-c", code, str(cfg)], capture_output=True, text=True,
                           env={"PYTHONPATH": str(SRC), "PATH": ""})
    finally:
        cfg.unlink(missing_ok=True)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr or r.stdout
