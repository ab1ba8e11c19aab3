"""vlpt: single-stream vision-language pretraining with pluggable objectives.

The names below load on first use, so torch-free parts (``vlpt.run_dir``, ``vlpt.recipe``, the
sweep's report) do not import torch just by being imported.
"""
from .errors import RecipeError, UserError

__version__ = "0.1.0"
__all__ = [
    "EncoderOutput", "Objective", "ObjectiveOutput", "RecipeError", "UserError",
    "get_objective", "register_objective", "registered_objectives", "__version__",
]

_LAZY = {"EncoderOutput": "objective", "Objective": "objective", "ObjectiveOutput": "objective",
         "get_objective": "registry", "register_objective": "registry", "registered_objectives": "registry"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vlpt' has no attribute {name!r}")
