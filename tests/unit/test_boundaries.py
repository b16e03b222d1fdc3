"""The import rules of CONVENTIONS.md §1, checked on the source."""

import ast
import os

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "migrate")


def _imports(path):
    tree = ast.parse(open(path).read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module


def _modules(pkg):
    base = os.path.join(ROOT, pkg)
    for dirpath, _, files in os.walk(base):
        for f in files:
            if f.endswith(".py") and not f.endswith("_pb2.py"):
                yield os.path.join(dirpath, f)


def test_kernel_imports_only_errors():
    for path in _modules("kernel"):
        for mod in _imports(path):
            if mod.startswith("migrate"):
                assert mod == "migrate" or mod.startswith("migrate.kernel") or \
                    mod == "migrate.errors", f"{path} imports {mod}"


def test_only_kernel_uses_cffi():
    for pkg in os.listdir(ROOT):
        if pkg == "kernel" or not os.path.isdir(os.path.join(ROOT, pkg)):
            continue
        for path in _modules(pkg):
            assert "cffi" not in set(_imports(path)), f"{path} imports cffi"
            assert "migrate.kernel._ffi" not in set(_imports(path)), path


def test_images_import_nothing_else_from_migrate():
    for path in _modules("images"):
        for mod in _imports(path):
            if mod.startswith("migrate"):
                assert mod.startswith("migrate.images") or mod == "migrate.errors", \
                    f"{path} imports {mod}"


def test_resources_import_only_kernel_and_images():
    for path in _modules("resources"):
        for mod in _imports(path):
            if mod.startswith("migrate."):
                ok = mod.split(".")[1] in ("kernel", "images", "resources", "errors")
                assert ok, f"{path} imports {mod}"


def test_lazypages_imports_only_kernel_images_pageserver():
    for path in _modules("lazypages"):
        for mod in _imports(path):
            if mod.startswith("migrate."):
                ok = mod.split(".")[1] in ("kernel", "images", "pageserver", "lazypages",
                                           "errors")
                assert ok, f"{path} imports {mod}"
                assert mod != "migrate.pageserver.server", f"{path} imports the server"


def test_orchestrator_never_imports_kernel():
    for path in _modules("orchestrator"):
        for mod in _imports(path):
            if mod.startswith("migrate."):
                assert mod.split(".")[1] != "kernel", f"{path} imports {mod}"
