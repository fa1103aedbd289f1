"""igpt: Image GPT, generative pretraining from pixels.

The public API, at the top level:

    from igpt import ImageGPT, ImageGPTConfig, Palette, load_run, sample, complete, linear_probe
    from igpt import read_images, completion_rows, pixel_bits   # your own pictures: completed, and their surprise
"""

from igpt.checkpoint import load_run
from igpt.data import DataConfig, read_images
from igpt.errors import IgptError
from igpt.evaluate import pixel_bits
from igpt.model import ImageGPT, ImageGPTConfig
from igpt.palette import Palette
from igpt.probe import linear_probe
from igpt.runrecord import RunInfo
from igpt.sample import complete, completion_rows, sample

__all__ = ["DataConfig", "IgptError", "ImageGPT", "ImageGPTConfig", "Palette", "RunInfo", "complete", "completion_rows",
           "linear_probe", "load_run", "pixel_bits", "read_images", "sample"]
__version__ = "0.2.0"
