"""The package layering, checked: which package may import which, and only public names across
packages.

    replay_bridge  <-  reference_engine, trainer_hooks  <-  replay_recipes

- No module imports another package's private module or name (``pkg._mod``, ``pkg._name``)
  unless ``pkg`` is the package directory the importing module lives in. Every ``import`` and
  ``from ... import`` is read from the source (also inside functions and ``TYPE_CHECKING``),
  relative ones resolved.
- ``replay_bridge`` imports none of ``reference_engine``, ``replay_recipes``,
  ``trainer_hooks``; ``reference_engine`` and ``trainer_hooks`` import neither
  ``replay_recipes`` nor each other.
- Importing any ``replay_bridge`` module loads none of those packages, nor torch or
  transformers, nor aiohttp outside the client (``replay_bridge.client``,
  ``replay_bridge.benchmarks.collect``, ``replay_bridge.ray``), nor ray outside
  ``replay_bridge.ray``: checked in fresh interpreters.
- Every name in a public package's ``__all__`` exists (httpx's exported-members test).
- Tests mirror the packages: ``tests/<pkg>/<sub>/`` may import the private modules of
  ``<pkg>.<sub>`` only.

A failure lists each offence as ``file:line: import ...: rule``.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("replay_bridge", "reference_engine", "replay_recipes", "trainer_hooks")
SCANNED = (*PACKAGES, "scripts")
# Who may import whom (besides itself); replay_recipes may import all three.
MAY_IMPORT = {
    "replay_bridge": set(),
    "reference_engine": {"replay_bridge"},
    "trainer_hooks": {"replay_bridge"},
    "replay_recipes": {"replay_bridge", "reference_engine", "trainer_hooks"},
    "scripts": {"replay_bridge", "reference_engine", "trainer_hooks", "replay_recipes"},
}
NEVER_LOADED_BY_THE_LIBRARY = ("reference_engine", "replay_recipes", "trainer_hooks", "torch",
                               "transformers")
HTTP_CLIENT = ("aiohttp",)
MAY_LOAD_HTTP_CLIENT = ("replay_bridge.client", "replay_bridge.benchmarks.collect",
                        "replay_bridge.ray")
CLUSTER_ENGINE = ("ray",)
MAY_LOAD_CLUSTER_ENGINE = ("replay_bridge.ray",)


@dataclass(frozen=True)
class Import:
    """One imported dotted path (a module, or ``module.name`` of a from-import)."""

    file: Path
    line: int
    source: str
    target: str

    def where(self) -> str:
        return f"{self.file.relative_to(ROOT)}:{self.line}: {self.source}"


def _is_private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def module_name(path: Path) -> tuple[str, str]:
    """``(module, package)``: the dotted name of a file, and of the package directory it
    lives in (for ``__init__.py``: the package itself)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
        return ".".join(parts), ".".join(parts)
    return ".".join(parts), ".".join(parts[:-1])


def imports_of(path: Path, text: str | None = None) -> Iterator[Import]:
    """Every import of ``path`` (or of ``text`` as if it were that file), relative ones
    resolved against its package."""
    text = path.read_text() if text is None else text
    lines = text.splitlines()
    _, package = module_name(path)
    for node in ast.walk(ast.parse(text, str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(path, node.lineno, lines[node.lineno - 1].strip(), alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                up = package.split(".")
                up = up[: len(up) - (node.level - 1)]
                base = ".".join(up + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            source = lines[node.lineno - 1].strip()
            if base == "__future__":
                continue
            yield Import(path, node.lineno, source, base)
            for alias in node.names:
                if alias.name != "*":
                    yield Import(path, node.lineno, source, f"{base}.{alias.name}")


def private_offence(imp: Import) -> str | None:
    """Why ``imp`` reaches into another package's private module or name, or ``None``."""
    parts = imp.target.split(".")
    if parts[0] not in PACKAGES:
        return None
    own = module_name(imp.file)[1]
    for i, part in enumerate(parts):
        if _is_private(part):
            owner = ".".join(parts[:i])
            if owner == own:
                return None
            private = ".".join(parts[: i + 1])
            return f"{imp.where()}: {private} is private to {owner} (this module lives in {own})"
    return None


def direction_offence(imp: Import) -> str | None:
    """Why ``imp`` goes against the one direction of imports, or ``None``."""
    top = imp.file.relative_to(ROOT).parts[0]
    target_top = imp.target.split(".")[0]
    if target_top == "tests":
        return f"{imp.where()}: {top} must not import the tests"
    if target_top in MAY_IMPORT and target_top != top and target_top not in MAY_IMPORT[top]:
        return f"{imp.where()}: {top} must not import {target_top}"
    return None


def sources() -> list[Path]:
    return sorted(p for top in SCANNED for p in (ROOT / top).rglob("*.py")
                  if "__pycache__" not in p.parts)


def offences(rule: Callable[[Import], str | None]) -> list[str]:
    return sorted({o for path in sources() for imp in imports_of(path)
                   if (o := rule(imp)) is not None})


def library_modules() -> list[str]:
    mods = []
    for path in sorted((ROOT / "replay_bridge").rglob("*.py")):
        if "__pycache__" in path.parts or path.name == "__main__.py":
            continue
        mods.append(module_name(path)[0])
    return mods


_PROBE = """
import importlib, json, sys
mods, watched = json.loads(sys.argv[1]), json.loads(sys.argv[2])
for m in mods:
    importlib.import_module(m)
print(json.dumps(sorted({w for w in watched for k in sys.modules
                         if k == w or k.startswith(w + ".")})))
"""


def loaded_by(mods: list[str], watched: tuple[str, ...]) -> list[str]:
    """Which of ``watched`` a fresh interpreter has loaded after importing ``mods``."""
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(mods), json.dumps(watched)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    if proc.returncode:
        raise AssertionError(f"importing {mods} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


def _may_load_http(mod: str) -> bool:
    return any(mod == m or mod.startswith(m + ".") for m in MAY_LOAD_HTTP_CLIENT)


def _may_load_ray(mod: str) -> bool:
    return any(mod == m or mod.startswith(m + ".") for m in MAY_LOAD_CLUSTER_ENGINE)


def test_the_scan_sees_each_kind_of_offence() -> None:
    """The rules on made-up sources: what they must flag, and what they must let through."""
    shards_mod = ROOT / "replay_bridge" / "shards" / "_made_up.py"
    engine_mod = ROOT / "reference_engine" / "_made_up.py"
    hooks_init = ROOT / "trainer_hooks" / "megatron" / "__init__.py"
    text = """
from ._reader import ShardReader
from .._payload import split
from ..protocols import _base
from ..protocols._base import Protocol
import replay_bridge.client._http
from ..checks import accept
def later():
    from reference_engine import serve_app
    import torch._C
"""

    def flagged(path: Path, rule: Callable[[Import], str | None]) -> list[str]:
        return list(dict.fromkeys(o for imp in imports_of(path, text) if (o := rule(imp))))

    private = flagged(shards_mod, private_offence)
    assert [o.split(": ")[1] for o in private] == [
        "from .._payload import split", "from ..protocols import _base",
        "from ..protocols._base import Protocol", "import replay_bridge.client._http"]
    assert private[0].startswith("replay_bridge/shards/_made_up.py:3: ")
    assert "replay_bridge.protocols._base is private to replay_bridge.protocols" in private[2]
    # From inside a package's own directory its private modules are fair game.
    inside = flagged(ROOT / "replay_bridge" / "protocols" / "_made_up.py", private_offence)
    assert [o.split(": ")[1] for o in inside] == ["from .._payload import split",
                                                  "import replay_bridge.client._http"]
    assert [o.split(": ")[-1] for o in flagged(shards_mod, direction_offence)] == [
        "replay_bridge must not import reference_engine"]
    assert not flagged(engine_mod, direction_offence)  # the engine may import the library
    assert [o.split(": ")[-1] for o in flagged(hooks_init, direction_offence)] == [
        "trainer_hooks must not import reference_engine"]


def test_no_module_imports_another_packages_private_module() -> None:
    found = offences(private_offence)
    if found:
        pytest.fail("imports of private modules across packages:\n" + "\n".join(found))


def test_imports_go_one_way() -> None:
    found = offences(direction_offence)
    if found:
        pytest.fail("imports against the layering:\n" + "\n".join(found))


def test_tests_import_private_modules_only_of_what_they_test() -> None:
    """``tests/<pkg>/<sub>/`` mirrors ``<pkg>.<sub>``: its tests may use that package's private
    modules (and those of the packages above or below it on that path), no others."""
    found = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        tested = ".".join(path.relative_to(ROOT / "tests").parts[:-1])
        for imp in imports_of(path):
            parts = imp.target.split(".")
            if parts[0] not in PACKAGES:
                continue
            for i, part in enumerate(parts):
                if _is_private(part):
                    owner = ".".join(parts[:i])
                    if tested and (owner == tested or owner.startswith(tested + ".")
                                   or tested.startswith(owner + ".")):
                        break
                    found.append(f"{imp.where()}: {'.'.join(parts[: i + 1])} is private to "
                                 f"{owner}; these tests mirror {tested or 'no package'}")
                    break
    if found:
        pytest.fail("tests reaching into another package's private modules:\n"
                    + "\n".join(sorted(set(found))))


def test_importing_the_library_loads_no_consumer_torch_or_http() -> None:
    mods = library_modules()
    plain = [m for m in mods if not _may_load_http(m)]
    watched = NEVER_LOADED_BY_THE_LIBRARY + HTTP_CLIENT + CLUSTER_ENGINE
    offences = []
    if loaded_by(plain, watched):  # one interpreter for all; per module only to say which
        for m in plain:
            offences += [f"import {m} loads {w}" for w in loaded_by([m], watched)]
    http = [m for m in mods if _may_load_http(m)]
    assert loaded_by(http, HTTP_CLIENT) == ["aiohttp"]  # the probe sees what is loaded
    if importlib.util.find_spec("ray") is not None:  # the probe sees ray where it may load
        assert loaded_by(list(MAY_LOAD_CLUSTER_ENGINE), CLUSTER_ENGINE) == ["ray"]
    ray_free = [m for m in http if not _may_load_ray(m)]
    if loaded_by(ray_free, CLUSTER_ENGINE):
        offences += [f"import {m} loads ray" for m in ray_free if loaded_by([m], CLUSTER_ENGINE)]
    if loaded_by(http, NEVER_LOADED_BY_THE_LIBRARY):
        for m in http:
            offences += [f"import {m} loads {w}"
                         for w in loaded_by([m], NEVER_LOADED_BY_THE_LIBRARY)]
    if offences:
        pytest.fail("the library loads what it must not:\n" + "\n".join(offences))


def public_packages() -> list[str]:
    out = []
    for top in PACKAGES:
        for init in sorted((ROOT / top).rglob("__init__.py")):
            name = module_name(init)[0]
            if "__pycache__" not in init.parts and not any(map(_is_private, name.split("."))):
                out.append(name)
    return out


@pytest.mark.parametrize("package", public_packages())
def test_exported_members_exist(package: str) -> None:
    try:
        module = importlib.import_module(package)
    except ModuleNotFoundError as e:  # an optional dependency (torch, megatron) not installed
        if (e.name or "").split(".")[0] in PACKAGES:
            raise
        pytest.skip(f"{package} needs {e.name}")
    exported = getattr(module, "__all__", None)
    if exported is None:
        reexports = [n for n in ast.walk(ast.parse(Path(module.__file__).read_text()))
                     if isinstance(n, ast.ImportFrom) and n.level]
        assert not reexports, f"{package} re-exports names but has no __all__"
        return
    duplicates = sorted({n for n in exported if list(exported).count(n) > 1})
    assert not duplicates, f"{package}.__all__ lists {duplicates} twice"
    missing = []
    for name in exported:
        try:
            getattr(module, name)
        except AttributeError:
            missing.append(name)
    assert not missing, f"{package}.__all__ names what it does not have: {missing}"


_CLI_PROBE = """
import json, sys
from replay_bridge.cli import command_line
app = command_line()
import typer.main
names = sorted(typer.main.get_command(app).commands)
heavy = sorted({w for w in ("torch", "transformers", "aiohttp", "megatron", "matplotlib", "ray")
                for k in sys.modules if k == w or k.startswith(w + ".")})
print(json.dumps({"commands": names, "heavy": heavy}))
"""


def test_the_command_line_starts_light_with_its_plugins() -> None:
    """Every ``replay-bridge`` run loads the plugins' command modules: they must register their
    commands without importing torch, transformers, aiohttp, megatron-core or matplotlib (those
    load inside a command), so that ``ingest`` or ``validate`` start as fast as before."""
    proc = subprocess.run([sys.executable, "-c", _CLI_PROBE], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.splitlines()[-1])
    assert {"demo", "serve", "route", "make-tiny-model", "ingest", "validate"} <= set(
        found["commands"]), found
    assert found["heavy"] == [], f"loading the CLI's plugins imports {found['heavy']}"
