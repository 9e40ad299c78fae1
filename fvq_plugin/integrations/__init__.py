"""How fvq_plugin attaches to pyiqa and lmms-eval, through their extension points."""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys


def register_when_pyiqa_loads() -> None:
    """Register now if pyiqa is imported, else right after it is, without importing it ourselves.

    Importing pyiqa costs seconds; users of the CLI or lmms-eval should not pay for it.
    """
    if "pyiqa" in sys.modules:
        from .pyiqa import register

        register()
        return

    class _AfterPyiqa(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "pyiqa":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            if spec is not None and spec.loader is not None:
                load = spec.loader.exec_module

                def exec_module(module):
                    load(module)
                    from .pyiqa import register

                    register()

                spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _AfterPyiqa())
