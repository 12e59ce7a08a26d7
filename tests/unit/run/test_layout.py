"""The layout's rules, checked on every module's imports (those inside functions count):

- the core (``flowrl_async/`` outside ``run/``) imports no component and not the
  orchestration; only the config schema may import the components' settings modules
  (``<component>.config``, ``replay.filter``), and only the CLI (the entry) anything;
- actors and learner reach replay only through ``flowrl_async.replay.client`` and never
  import each other or the orchestration;
- replay imports neither actors, learner nor the orchestration;
- nothing but the CLI imports the orchestration (``flowrl_async.run``).
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
COMPONENTS = ("actors", "learner", "replay")
SETTINGS = {f"flowrl_async.{c}.config" for c in COMPONENTS} | {"flowrl_async.replay.filter"}


def modules() -> dict[str, Path]:
    """Dotted module name -> file, as installed (``actors/x.py`` is flowrl_async.actors.x)."""
    out = {}
    for top in ("flowrl_async", *COMPONENTS):
        for path in (ROOT / top).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if top != "flowrl_async":
                parts = ["flowrl_async", *parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def imports(path: Path, module: str) -> set[str]:
    """Every flowrl_async module ``path`` imports, anywhere in it."""
    found = set()
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package up
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}  # from pkg import module
    return {name for name in found if name.split(".")[0] in ("flowrl_async", *COMPONENTS)}


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in (*COMPONENTS, "run") else "core"


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations() -> list[str]:
    known = modules()
    out = []
    for module, path in sorted(known.items()):
        me = layer(module)
        names = set()
        for name in imports(path, module):
            if name.split(".")[0] in COMPONENTS:
                out.append(f"{module} imports {name}: import it as flowrl_async.{name}")
            elif name not in known and name.rsplit(".", 1)[0] in known:
                names.add(name.rsplit(".", 1)[0])  # from module import function
            else:
                names.add(name)
        for name in sorted(names):
            them = layer(name)
            if them == me or name == "flowrl_async":
                continue
            if module == "flowrl_async.cli":
                continue  # the entry starts everything
            if them == "run":
                out.append(f"{module} imports the orchestration ({name}): only the CLI may")
            elif me == "core" and them in COMPONENTS:
                if not (module == "flowrl_async.config" and name in SETTINGS):
                    out.append(f"{module} (core) imports the component module {name}")
            elif me in ("actors", "learner") and them in ("actors", "learner"):
                out.append(f"{module} imports {name}: actors and learner never import each other")
            elif me in ("actors", "learner") and them == "replay":
                if not within(name, "flowrl_async.replay.client"):
                    out.append(f"{module} imports {name}: only flowrl_async.replay.client")
            elif me == "replay" and them in ("actors", "learner"):
                out.append(f"{module} imports {name}: replay imports neither actors nor learner")
    return out


def test_the_tree_keeps_the_layout_rules():
    assert len(modules()) > 60  # the walk sees the whole tree
    assert violations() == []


def test_the_rules_catch_each_kind_of_crossing(tmp_path, monkeypatch):
    # the same walk on a small fake tree with one crossing of each kind
    import test_layout

    tree = {
        "flowrl_async/__init__.py": "",
        "flowrl_async/cli.py": "import flowrl_async.run.launch",
        "flowrl_async/config.py": "from flowrl_async.learner.config import A\n"
        "from flowrl_async.learner.learner import L",
        "flowrl_async/model.py": "def f():\n    from flowrl_async.replay import client",
        "flowrl_async/run/__init__.py": "",
        "flowrl_async/run/launch.py": "from flowrl_async.actors import worker",
        "actors/__init__.py": "",
        "actors/worker.py": "from flowrl_async.replay.client import C\n"
        "from flowrl_async.replay.buffer import B\nimport actors.x",
        "learner/__init__.py": "",
        "learner/learner.py": "from flowrl_async.actors.worker import W\n"
        "from flowrl_async.run.launch import train",
        "learner/config.py": "",
        "replay/__init__.py": "",
        "replay/client.py": "",
        "replay/buffer.py": "from ..learner import learner",
    }
    for rel, text in tree.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    monkeypatch.setattr(test_layout, "ROOT", tmp_path)
    assert test_layout.violations() == [
        "flowrl_async.actors.worker imports actors.x: import it as flowrl_async.actors.x",
        "flowrl_async.actors.worker imports flowrl_async.replay.buffer: only flowrl_async.replay.client",
        "flowrl_async.config (core) imports the component module flowrl_async.learner.learner",
        "flowrl_async.learner.learner imports flowrl_async.actors.worker: actors and learner never import each other",
        "flowrl_async.learner.learner imports the orchestration (flowrl_async.run.launch): only the CLI may",
        "flowrl_async.model (core) imports the component module flowrl_async.replay",
        "flowrl_async.model (core) imports the component module flowrl_async.replay.client",
        "flowrl_async.replay.buffer imports flowrl_async.learner: replay imports neither actors nor learner",
        "flowrl_async.replay.buffer imports flowrl_async.learner.learner: replay imports neither actors nor learner",
    ]
