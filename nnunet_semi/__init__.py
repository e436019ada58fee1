"""nnunet-semi: semi-supervised segmentation as nnU-Net v2 trainers."""
__version__ = "0.1.0"
