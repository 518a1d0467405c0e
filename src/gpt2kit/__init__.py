"""gpt2kit: GPT-2 text generation, fine-tuning, evaluation and serving."""

__version__ = "0.1.0"

from gpt2kit.config import GPTConfig  # noqa: E402
from gpt2kit.errors import Gpt2kitError  # noqa: E402

__all__ = ["GPTConfig", "Gpt2kitError", "__version__"]
