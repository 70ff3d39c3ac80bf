"""homeseek: DeepSeek-V4-Flash on one consumer GPU plus host RAM."""

__version__ = "0.1.0"

from homeseek.engine import ContextError, Engine, Session, load

__all__ = ["load", "Engine", "Session", "ContextError", "__version__"]
