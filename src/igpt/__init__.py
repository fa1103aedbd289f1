"""igpt: Image GPT, generative pretraining from pixels."""

from igpt.errors import IgptError
from igpt.model import ImageGPT, ImageGPTConfig
from igpt.palette import Palette

__all__ = ["IgptError", "ImageGPT", "ImageGPTConfig", "Palette"]
__version__ = "0.1.0"
