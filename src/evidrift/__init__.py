"""evidrift: did fine-tuning change the visual evidence an image classifier relies on?"""

# Must run before anything imports timm or torchvision.
from evidrift.core import compat as compat

__version__ = "0.1.0"
