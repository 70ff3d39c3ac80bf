"""homeseek: DeepSeek-V4-Flash on one consumer GPU plus host RAM."""

__version__ = "0.1.0"
