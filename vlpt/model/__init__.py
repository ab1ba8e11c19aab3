"""The model: embedders, trunk, optional image backbone, BERT checkpoint I/O."""
from .backbone import GridBackbone, grid_boxes
from .embeddings import RegionEmbedder, TextEmbedder, box_features
from .trunk import Pooler, Trunk
from .vl_model import VLModel, init_weights

__all__ = ["GridBackbone", "grid_boxes", "RegionEmbedder", "TextEmbedder", "box_features", "Pooler", "Trunk", "VLModel", "init_weights"]
