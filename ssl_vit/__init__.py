"""ssl-vit: self-supervised pretraining of Vision Transformers on one shared timm backbone."""

__version__ = "0.1.0"
