"""vlpt: single-stream vision-language pretraining with pluggable objectives."""
from .errors import RecipeError, UserError
from .objective import EncoderOutput, Objective, ObjectiveOutput
from .registry import get_objective, register_objective, registered_objectives

__version__ = "0.1.0"
__all__ = [
    "EncoderOutput", "Objective", "ObjectiveOutput", "RecipeError", "UserError",
    "get_objective", "register_objective", "registered_objectives", "__version__",
]
