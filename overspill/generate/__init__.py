from .config import GenerationConfig
from .loop import generate_ids, stream_ids

__all__ = ["GenerationConfig", "generate_ids", "stream_ids"]
