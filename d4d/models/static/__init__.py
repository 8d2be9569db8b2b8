"""The static module's networks (reference.md section 5, after SEVA): a multi-view UNet inflated
from a diffusers image UNet, its camera/image conditioning and its chunked sampler."""
from d4d.models.static.unet import MultiViewUNet

__all__ = ["MultiViewUNet"]
