"""crn_fast: Cascaded Refinement Networks (Chen & Koltun, ICCV 2017)."""
from .checkpoint import load_generator, save_generator
from .config import PRESETS, CRNConfig, get_preset
from .errors import CheckpointError, CRNError
from .labels import CITYSCAPES, ClassSet, read_classes
from .model import CRN, RefinementModule, layout_pyramid

__all__ = ["CRN", "CRNConfig", "RefinementModule", "PRESETS", "get_preset", "layout_pyramid", "save_generator",
           "load_generator", "ClassSet", "CITYSCAPES", "read_classes", "CRNError", "CheckpointError"]
__version__ = "0.1.0"
