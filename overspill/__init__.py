"""overspill: run GPT-style language models bigger than your hardware."""
from .api import Model, default_model_path, load
from .errors import CheckpointError, ConfigError, OverspillError

__all__ = ["load", "Model", "default_model_path", "OverspillError", "CheckpointError", "ConfigError"]
__version__ = "0.1.0"
