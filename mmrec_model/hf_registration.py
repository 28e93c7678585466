"""Registers MM-Rec with transformers' Auto classes when transformers is imported.

``import mmrec_model`` calls ``register_with_transformers``: without transformers installed
it does nothing; with transformers already imported it imports ``mmrec_model.hf`` (which
registers); otherwise it waits for the first ``import transformers`` and registers right
after it. Importing transformers' model classes takes seconds, which ``import mmrec_model``
alone should not cost.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

HF_MODULE = "mmrec_model.hf"


def register_with_transformers() -> None:
    if sys.modules.get("transformers") is not None:
        register()
    elif importlib.util.find_spec("transformers") is not None:
        sys.meta_path.insert(0, RegisterAfterImport())


def register() -> None:
    """Imports ``mmrec_model.hf``; a transformers it does not work with gets a warning, not an error."""
    try:
        importlib.import_module(HF_MODULE)
    except Exception as err:
        warnings.warn(f"mmrec_model: not registered with transformers ({type(err).__name__}: {err})", stacklevel=2)


class RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Leaves ``sys.meta_path`` at the first search for transformers, finds it as the other
    finders do, and has its loader call ``register`` once the module has run."""

    def find_spec(self, name, path, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run_module = spec.loader.exec_module

        def run_then_register(module):
            run_module(module)
            register()

        spec.loader.exec_module = run_then_register
        return spec
