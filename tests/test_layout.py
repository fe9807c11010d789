"""The layout rules of the repository, checked on the tree itself:

* one top-level package, ``engine`` (the wheel installs nothing else; nothing imports a top-level
  ``kernels``, which is also Hugging Face's package of that name);
* no source or test folder that tools skip (pytest's ``norecursedirs``: ``dist``, ``build``, ...), and every
  ``tests/**/test_*.py`` is collected by the README's test command;
* no import cycle between the modules of ``engine/``, and each package imports only its own layer or the
  layers below (docs/architecture.md); ``engine/kernels`` imports torch and triton only;
* tests mirror the source: each package of ``engine/`` has its ``tests/<package>/``;
* the ``python -m engine.<command>`` modules stay thin (argument parsing, then a call into a package).
"""

from __future__ import annotations

import ast
import fnmatch
import pathlib
import subprocess
import sys
import zipfile

import pytest

from tests.conftest import COLLECTED_MODULES

REPO = pathlib.Path(__file__).resolve().parents[1]
ENGINE = REPO / "engine"
TESTS = REPO / "tests"
COMMANDS = ("train", "prepare", "plan", "export", "plot", "bench", "quickstart")
# docs/architecture.md's layers: a package may import its own layer and the ones below
LAYERS = {
    "config": 0,
    "errors": 0,
    "log": 0,
    "distributed": 1,
    "kernels": 1,
    "tensor_parallel": 2,
    "optim": 2,
    "data": 2,
    "resilience": 2,
    "model": 3,
    "zero": 3,
    "pipeline": 4,
    "checkpoint": 4,
    "hf": 4,
    "metrics": 4,
    "planning": 4,
    "training": 5,
    "benchmarks": 5,
    **{c: 5 for c in COMMANDS},
}


def _python_files(*roots: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for root in roots for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> list[str]:
    """Absolute names of everything ``path`` imports (module level or inside functions), except under
    ``if TYPE_CHECKING:``; ``from a import b`` yields ``a.b`` (a module or a name in ``a``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for n in ast.walk(node)
    }
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    names = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            names += [f"{base}.{a.name}" for a in node.names]
    return names


def test_the_wheel_holds_engine_only(tmp_path):
    """Build the wheel as pip would (the C++ extension included) and list its top-level names."""
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(REPO),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = tmp_path.glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        top = {name.split("/")[0] for name in z.namelist()}
        names = z.namelist()
    assert {t for t in top if not t.endswith((".dist-info", ".data"))} == {"engine"}
    assert "engine/kernels/__init__.py" in names and any(n.startswith("engine/data/_index_cpp") for n in names)
    assert not (REPO / "kernels").exists(), "a top-level kernels/ folder shadows Hugging Face's package"


def test_nothing_imports_a_top_level_kernels_package():
    offenders = [
        f"{p.relative_to(REPO)}: {name}"
        for p in _python_files(ENGINE, TESTS, REPO / "tools")
        for name in _imports(p)
        if name == "kernels" or name.startswith("kernels.")
    ]
    assert not offenders, offenders


def test_no_folder_that_tools_skip():
    skipped = ("*.egg", ".*", "_darcs", "build", "CVS", "dist", "node_modules", "venv", "{arch}")
    bad = [
        str(d.relative_to(REPO))
        for root in (ENGINE, TESTS)
        for d in root.rglob("*")
        if d.is_dir() and d.name != "__pycache__" and any(fnmatch.fnmatch(d.name, pat) for pat in skipped)
    ]
    assert not bad, f"folders pytest and packaging tools skip: {bad}"


def test_every_test_file_is_collected(request: pytest.FixtureRequest):
    args = [pathlib.Path(a.split("::")[0]).resolve() for a in request.config.args]
    if not any(a in (TESTS, REPO) for a in args):
        pytest.skip("only meaningful when the whole suite is collected (the README's test command)")
    collected = request.config.stash[COLLECTED_MODULES]
    missing = [str(p.relative_to(REPO)) for p in sorted(TESTS.rglob("test_*.py")) if p.resolve() not in collected]
    assert not missing, f"test files pytest never collected: {missing}"


def _engine_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in _python_files(ENGINE)}

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in modules.items():
        deps = {resolve(i) for i in _imports(path) if i.startswith("engine")}
        graph[name] = {d for d in deps if d and d != name}
    return graph


def test_no_import_cycles_in_engine():
    graph = _engine_graph()
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_packages_import_only_their_layer_and_below():
    graph = _engine_graph()
    top = {name.split(".")[1] for name in graph if name.count(".")}
    assert top <= set(LAYERS), f"packages without a layer in docs/architecture.md: {sorted(top - set(LAYERS))}"
    upward = [
        f"{m} -> {d}"
        for m, deps in graph.items()
        if m.count(".")
        for d in deps
        if d.count(".") and LAYERS[d.split(".")[1]] > LAYERS[m.split(".")[1]]
    ]
    assert not upward, f"imports of a higher layer: {upward}"


def test_kernels_import_torch_and_triton_only():
    bad = [
        f"{p.relative_to(REPO)}: {name}"
        for p in _python_files(ENGINE / "kernels")
        for name in _imports(p)
        if name.split(".")[0] not in ("torch", "triton", "__future__", "engine")
        and name.split(".")[0] not in sys.stdlib_module_names
        or (name.startswith("engine.") and not name.startswith("engine.kernels"))
    ]
    assert not bad, bad


def test_tests_mirror_the_source():
    packages = sorted(d.name for d in ENGINE.iterdir() if (d / "__init__.py").is_file())
    missing = [p for p in packages if not list((TESTS / p).glob("test_*.py"))]
    assert not missing, f"packages of engine/ without tests/<package>/test_*.py: {missing}"


@pytest.mark.parametrize("command", COMMANDS)
def test_commands_are_thin_entry_points(command):
    tree = ast.parse((ENGINE / f"{command}.py").read_text(encoding="utf-8"))
    functions = [n.name for n in tree.body if isinstance(n, ast.FunctionDef)]
    classes = [n.name for n in tree.body if isinstance(n, ast.ClassDef)]
    assert not classes and set(functions) <= {"main", "parse_args"}, (functions, classes)
    assert (ENGINE / f"{command}.py").read_text(encoding="utf-8").count("\n") <= 80
