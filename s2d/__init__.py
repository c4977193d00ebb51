"""s2d: turn a pretrained static CNN into a dynamic multi-stage network."""

from s2d.errors import S2DError, UnsupportedModelError

__version__ = "0.1.0"
__all__ = ["S2DError", "UnsupportedModelError", "__version__"]
