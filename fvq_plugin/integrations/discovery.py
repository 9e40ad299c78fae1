"""How pyiqa and lmms-eval find fvq-plugin with no `import fvq_plugin`: one post-import hook.

Neither framework offers an entry point that is read early enough: pyiqa 0.1.16's
`create_metric` checks its DEFAULT_CONFIGS table before it loads any plugin, and lmms-eval 0.7.3
loads model entry points (we use that one) but has none for task folders (its LMMS_EVAL_PLUGINS
variable adds them after the TaskManager has indexed its tasks). So `fvq_plugin-discovery.pth`,
installed into site-packages, calls `install()` at interpreter start. That puts one finder on
sys.meta_path which does nothing until `pyiqa` or `lmms_eval.tasks` is imported, and then,
right after that module has run, registers the `fvq_rater` metric or our task folder.

At interpreter start this imports only the standard library (tests/test_lmms_eval.py measures
it), never raises, and leaves every other import alone. FVQ_PLUGIN_DISCOVERY=0 turns it off.
"""
from __future__ import annotations

import os
import sys
import warnings

from ..common import DISCOVERY_ENV


def _register_pyiqa(module) -> None:
    from .pyiqa import register

    register()


def _register_lmms_eval_tasks(module) -> None:
    from .lmms_eval import add_task_folder

    add_task_folder(module.TaskManager)


# module name -> what to do right after it has been imported
HOOKS = {"pyiqa": _register_pyiqa, "lmms_eval.tasks": _register_lmms_eval_tasks}


class _AfterImport:
    """A sys.meta_path finder that finds nothing itself: it wraps the real loader of a watched module
    to run its hook right after it. (Not an importlib.abc.MetaPathFinder: importing that module
    alone would cost more than the whole hook is allowed at interpreter start.)"""

    def __init__(self):
        self.pending = {name: hook for name, hook in HOOKS.items() if name not in sys.modules}

    def find_spec(self, name, path, target=None):
        hook = self.pending.get(name)
        if hook is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            # Forgotten only now: importlib.util.find_spec (demo_data locates package files with it) asks for a
            # spec without importing, and a module whose import fails is imported afresh next time.
            self.forget(name)
            _run(hook, name, module)

        spec.loader.exec_module = exec_module
        return spec

    def forget(self, name: str) -> None:
        self.pending.pop(name, None)
        if not self.pending and self in sys.meta_path:
            sys.meta_path.remove(self)


def _run(hook, name, module) -> None:
    try:
        hook(module)
    except Exception as error:  # the framework must keep working even if our registration fails
        warnings.warn(f"fvq-plugin could not register with {name}: {type(error).__name__}: {error}", RuntimeWarning,
                      stacklevel=2)


_installed = False


def install() -> None:
    """Register with the frameworks already imported; watch for the others. Idempotent."""
    global _installed
    if _installed or os.environ.get(DISCOVERY_ENV, "1") == "0":
        return
    _installed = True
    for name, hook in HOOKS.items():
        if name in sys.modules:
            _run(hook, name, sys.modules[name])
    finder = _AfterImport()
    if finder.pending:
        sys.meta_path.insert(0, finder)
