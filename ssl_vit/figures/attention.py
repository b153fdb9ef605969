"""DINO's picture: where the CLS token looks in the last block, one map per head.

Caron et al. 2021 (fig. 1 and 3) show the last block's CLS-to-patch attention of each head over the
image; with self-distillation the heads pick out objects without ever seeing a label. The maps come
from `Backbone.forward_with_attention`, which records the probabilities without changing the forward.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from einops import rearrange, repeat
from torch import Tensor

from ssl_vit.backbone import Backbone
from ssl_vit.errors import RecipeError
from ssl_vit.figures._mpl import FONT, grid_figure, save, show_image


def cls_attention(backbone: Backbone, imgs: Tensor) -> Tensor:
    """CLS-to-patch attention of the last block, upsampled to the image: (B, C, H, W) -> (B, heads, H, W).

    Each patch's value is repeated over its pixels (nearest upsampling, as DINO's script), so a map
    shows exactly what the model computed. Rows of the full attention sum to one; the patch part
    shown here sums to one minus the attention the CLS token pays to prefix tokens.
    """
    if backbone.num_prefix_tokens == 0:
        raise RecipeError("this backbone has no CLS token (no prefix tokens): nothing to draw")
    was_training = backbone.training
    backbone.eval()
    _, attn = backbone.forward_with_attention(imgs)  # (B, heads, P+N, P+N)
    backbone.train(was_training)
    h, w = backbone.grid_of(imgs)
    cls_to_patch = attn[:, :, 0, backbone.num_prefix_tokens :]  # (B, heads, N)
    maps = rearrange(cls_to_patch, "b k (h w) -> b k h w", h=h, w=w)  # (B, heads, h, w)
    p = backbone.patch_size
    return repeat(maps, "b k h w -> b k (h p) (w q)", p=p, q=p)  # (B, heads, H, W)


def attention_layout(n_images: int, n_heads: int) -> tuple[int, int]:
    """(rows, cols): one row per image, the input then one column per head."""
    return n_images, 1 + n_heads


def draw_attention(images: np.ndarray, maps: Tensor | np.ndarray, out: Path) -> Path:
    """images (B, H, W, C) in [0, 1]; maps (B, heads, H', W') with H' W' at most the image size."""
    maps = maps.detach().cpu().numpy() if isinstance(maps, torch.Tensor) else maps
    rows, cols = attention_layout(images.shape[0], maps.shape[1])
    fig, axes = grid_figure(rows, cols)
    grey = images.mean(-1)  # (B, H, W) background under the map
    for i in range(rows):
        show_image(axes[i, 0], images[i], "input" if i == 0 else None)
        for k in range(maps.shape[1]):
            ax = axes[i, k + 1]
            height, width = maps.shape[2:]
            ax.imshow(grey[i, :height, :width], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.imshow(maps[i, k], cmap="inferno", alpha=0.7, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"head {k + 1}", fontsize=FONT)
    fig.suptitle("last block: CLS-to-patch attention per head", fontsize=FONT + 1)
    fig.tight_layout()
    return save(fig, out)
