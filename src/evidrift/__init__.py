"""evidrift: did fine-tuning change the visual evidence an image classifier relies on?"""

from evidrift import _compat as _compat  # noqa: F401  (must run before anything imports timm/torchvision)

__version__ = "0.1.0"
