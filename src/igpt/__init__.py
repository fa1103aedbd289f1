"""igpt: Image GPT, generative pretraining from pixels.

The public API, at the top level:

    from igpt import ImageGPT, ImageGPTConfig, Palette, load_run, sample, complete, linear_probe
"""

from igpt.checkpoint import RunInfo, load_run
from igpt.data import DataConfig
from igpt.errors import IgptError
from igpt.model import ImageGPT, ImageGPTConfig
from igpt.palette import Palette
from igpt.probe import linear_probe
from igpt.sample import complete, sample

__all__ = ["DataConfig", "IgptError", "ImageGPT", "ImageGPTConfig", "Palette", "RunInfo", "complete", "linear_probe",
           "load_run", "sample"]
__version__ = "0.1.0"
