"""The dynamic module's networks: Wan 2.1 I2V with Plücker camera conditioning and epipolar attention."""
from d4d.models.dynamic.backbone import WAN_TEXT_TOKENS, WanParts, backbone_spec, build_tiny_wan, load_wan, save_wan
from d4d.models.dynamic.model import DynamicWan

__all__ = ["WAN_TEXT_TOKENS", "WanParts", "backbone_spec", "build_tiny_wan", "load_wan", "save_wan", "DynamicWan"]
