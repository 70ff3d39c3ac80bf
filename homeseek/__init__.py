"""homeseek: DeepSeek-V4-Flash on one consumer GPU plus host RAM.

Names and submodules are imported on first use (PEP 562), so `homeseek.synthetic`,
`homeseek.config`, ... work right after `import homeseek`, while `homeseek --help`, `--version`
and usage errors answer without importing torch (about two seconds).
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:  # what static tools and readers follow; at run time __getattr__ does this
    from homeseek import (  # noqa: F401
        chat,
        checkpoint,
        config,
        engine,
        experts,
        plan,
        profile,
        quant,
        sampling,
        synthetic,
        tokenizer,
    )
    from homeseek.engine import ContextError, Engine, Session, load

_NAMES = {"load": "engine", "Engine": "engine", "Session": "engine", "ContextError": "engine"}


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        value = getattr(importlib.import_module(f"homeseek.{_NAMES[name]}"), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"homeseek.{name}") is not None:
        # any submodule, present or added later, without a list to keep in step
        value = importlib.import_module(f"homeseek.{name}")
    else:
        raise AttributeError(f"module 'homeseek' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


__all__ = ["load", "Engine", "Session", "ContextError", "__version__"]
