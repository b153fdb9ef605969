"""The shared ViT backbone: a thin wrapper over a timm `VisionTransformer`.

Every objective trains the same backbone. It splits timm's `forward_features` in two so objectives
can act on patch tokens before the transformer runs:

    tokens = backbone.embed(imgs)                  # (B, N, D) patch embeddings, no position yet
    tokens = where(mask, mask_token, tokens)       # BERT-style replacement (the objective's job)
    out = backbone.encode(tokens, keep_idx=idx)    # (B, P + N', D); MAE keeps N' < N tokens

With no mask, `encode(embed(x))` equals timm's `forward_features(x)`. The timm model sits under
`self.vit`, so `backbone.vit.state_dict()` is a plain timm state dict. This is the only module that
touches timm internals.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import timm
import torch
from einops import rearrange
from timm.layers import DropPath, resample_abs_pos_embed, resample_patch_embed
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models import adapt_input_conv
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from ssl_vit.config import ModelConfig
from ssl_vit.errors import CheckpointError, RecipeError

_EXPLICIT_SIZES = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")
# Layer 0 for layer-wise lr decay: everything before the first block (MAE's `lr_decay.py`).
_EMBEDDINGS = frozenset({"cls_token", "reg_token", "dist_token", "pos_embed", "patch_embed"})
_BLOCK = re.compile(r"blocks\.(\d+)\.")
INIT_SCHEMES = ("timm", "mae", "mocov3")


def timm_model_args(cfg: ModelConfig) -> dict[str, Any]:
    """The keyword arguments for `timm.create_model` that this recipe asks for."""
    args: dict[str, Any] = {
        "img_size": cfg.img_size,
        "in_chans": cfg.in_chans,
        "num_classes": 0,
        "global_pool": cfg.global_pool,
        "drop_path_rate": cfg.drop_path_rate,
        # Any input size works (DINO's local crops); position embeddings are resampled to the grid.
        "dynamic_img_size": True,
    }
    args.update({k: getattr(cfg, k) for k in _EXPLICIT_SIZES if getattr(cfg, k) is not None})
    return args


@dataclass
class LoadedWeights:
    """What `Backbone.load_timm_weights` did."""

    loaded: list[str]  # keys copied in
    missing: list[str]  # this backbone's tensors the state lacks, left as they were
    adapted: list[str]  # one line per tensor resized, converted or not loaded


class Backbone(nn.Module):
    """A timm ViT plus the split forward that the objectives need.

    Attributes: `embed_dim` (D), `patch_size`, `grid_size` (h, w) at the recipe's image size,
    `num_prefix_tokens` (P: class and register tokens).
    """

    def __init__(self, vit: nn.Module, fixed_sincos: bool = False, init: str = "timm") -> None:
        super().__init__()
        if not isinstance(vit, VisionTransformer):
            raise RecipeError(f"model '{type(vit).__name__}' is not a timm VisionTransformer")
        self.vit = vit
        self.embed_dim: int = vit.embed_dim
        self.num_prefix_tokens: int = vit.num_prefix_tokens
        self.patch_size: int = vit.patch_embed.patch_size[0]
        self.grid_size: tuple[int, int] = tuple(vit.patch_embed.grid_size)  # type: ignore[assignment]
        self.in_chans: int = vit.patch_embed.proj.in_channels
        if init not in INIT_SCHEMES:
            raise RecipeError(f"model.init must be one of {', '.join(INIT_SCHEMES)}, not '{init}'")
        self.init_scheme = init
        self._init_as(init)
        if fixed_sincos:
            self._set_fixed_sincos()

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> Backbone:
        """Build by timm name, with the recipe's explicit sizes taking precedence."""
        if not timm.is_model(cfg.name):
            close = timm.list_models(f"*{cfg.name.split('_')[0]}*")[:3]
            raise RecipeError(f"model.name '{cfg.name}' is not a timm model (close: {', '.join(close)})")
        if cfg.pos_embed not in ("learned", "sincos"):
            raise RecipeError(f"model.pos_embed must be 'learned' or 'sincos', not '{cfg.pos_embed}'")
        try:
            vit = timm.create_model(cfg.name, pretrained=False, **timm_model_args(cfg))
        except (TypeError, AssertionError, ValueError) as err:
            raise RecipeError(f"model: timm cannot build '{cfg.name}' with {asdict(cfg)}: {err}") from None
        return cls(vit, fixed_sincos=cfg.pos_embed == "sincos", init=cfg.init)

    def _init_as(self, scheme: str) -> None:
        """Redraw the weights as the named code base initialises its ViT; `timm` keeps timm's init.

        `mae` (MAE `models_mae.py` `initialize_weights`): every linear layer xavier-uniform (qkv as
        one matrix) with zero bias, the patch projection xavier-uniform over its flattened fan-in
        (bias as PyTorch draws it), the class token normal(0, 0.02). `mocov3` (MoCo v3 `vits.py`
        `VisionTransformerMoCo.__init__`): linear layers xavier-uniform with zero bias, but q, k and v
        each with their own fan-out (bound sqrt(6 / (3D/3 + D))); the patch projection the same
        xavier bound with zero bias; the class token normal(0, 1e-6). Both keep LayerNorm at 1 and 0,
        as timm builds it. Their fixed sin-cos position embedding is `model.pos_embed: sincos`.
        """
        if scheme == "timm":
            return
        for name, module in self.vit.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            if scheme == "mocov3" and name.endswith("qkv"):
                bound = math.sqrt(6.0 / (module.out_features // 3 + module.in_features))
                nn.init.uniform_(module.weight, -bound, bound)
            else:
                nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        proj = self.vit.patch_embed.proj
        with torch.no_grad():
            nn.init.xavier_uniform_(proj.weight.view(proj.out_channels, -1))
            if scheme == "mocov3" and proj.bias is not None:
                proj.bias.zero_()
        cls_token = self.vit.cls_token
        if cls_token is not None:
            nn.init.normal_(cls_token, std=0.02 if scheme == "mae" else 1e-6)

    def _set_fixed_sincos(self) -> None:
        """Fixed 2-D sin-cos position embeddings (MAE); prefix positions are zero."""
        pos = self.vit.pos_embed
        assert pos is not None, "sincos needs an absolute position embedding"
        grid = build_sincos2d_pos_embed(list(self.grid_size), dim=self.embed_dim)  # (h*w, D)
        with torch.no_grad():
            pos.zero_()
            pos[:, pos.shape[1] - grid.shape[0] :] = grid.to(pos.dtype)
        pos.requires_grad_(False)

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    def grid_of(self, imgs: Tensor) -> tuple[int, int]:
        """Patch grid (h, w) of an image batch (B, C, H, W)."""
        return imgs.shape[-2] // self.patch_size, imgs.shape[-1] // self.patch_size

    def embed(self, imgs: Tensor) -> Tensor:
        """Patch embeddings without position: (B, C, H, W) -> (B, N, D)."""
        tokens = self.vit.patch_embed(imgs)  # (B, h, w, D) since dynamic_img_size
        if tokens.ndim == 4:
            tokens = rearrange(tokens, "b h w d -> b (h w) d")
        return tokens

    @staticmethod
    def replace_tokens(tokens: Tensor, mask: Tensor, replacement: Tensor) -> Tensor:
        """BERT-style corruption: tokens (B, N, D) where mask (B, N) is True become `replacement`.

        `replacement` is a learned mask token (D,) or per-position embeddings (B, N, D).
        """
        return torch.where(mask.unsqueeze(-1), replacement.to(tokens.dtype).expand_as(tokens), tokens)

    @property
    def _pos_prefix(self) -> int:
        """Prefix tokens that have a row in `pos_embed` (none where timm adds no position to them)."""
        return 0 if self.vit.no_embed_class else self.num_prefix_tokens

    def patch_pos_embed(self, grid: tuple[int, int]) -> Tensor:
        """Position embeddings of the patch tokens, resampled to `grid`: (1, h*w, D)."""
        pos = self.vit.pos_embed
        assert pos is not None
        prefix = self._pos_prefix
        if tuple(grid) != self.grid_size:
            pos = resample_abs_pos_embed(
                pos, new_size=list(grid), old_size=list(self.grid_size), num_prefix_tokens=prefix
            )
        return pos[:, prefix:]

    def _prefix_tokens(self, batch_size: int) -> Tensor:
        """Class and register tokens with their position embeddings: (B, P, D)."""
        vit = self.vit
        parts = []
        if vit.cls_token is not None:
            parts.append(vit.cls_token.expand(batch_size, -1, -1))
        if vit.reg_token is not None:
            parts.append(vit.reg_token.expand(batch_size, -1, -1))
        if not parts:
            return torch.zeros(batch_size, 0, self.embed_dim, device=vit.patch_embed.proj.weight.device)
        prefix = torch.cat(parts, dim=1)
        if vit.pos_embed is not None and not vit.no_embed_class:
            prefix = prefix + vit.pos_embed[:, : self.num_prefix_tokens]
        return prefix

    def encode(
        self, tokens: Tensor, keep_idx: Tensor | None = None, grid: tuple[int, int] | None = None
    ) -> Tensor:
        """Add positions, prepend prefix tokens, run the blocks and the final norm.

        tokens: (B, N, D) from `embed` (possibly edited), on a grid of N = h*w patches.
        keep_idx: (B, N') indices of the patches to keep; only those (and their position
            embeddings) go through the blocks, which is MAE's encoder.
        grid: (h, w) of `tokens`; inferred as square when omitted.
        Returns (B, P + N', D).
        """
        batch, n, _ = tokens.shape
        if grid is None:
            side = math.isqrt(n)
            grid = (side, side) if side * side == n else self.grid_size
        if self.vit.pos_embed is not None:
            tokens = tokens + self.patch_pos_embed(grid)
        if keep_idx is not None:
            tokens = torch.gather(
                tokens, 1, keep_idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
            )  # (B, N', D)
        x = torch.cat([self._prefix_tokens(batch), tokens], dim=1)  # (B, P + N', D)
        x = self.vit.norm_pre(self.vit.pos_drop(x))
        x = self.vit.blocks(x)
        return self.vit.norm(x)

    def forward_features(self, imgs: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, P + N, D), equal to timm's `forward_features`."""
        return self.encode(self.embed(imgs), grid=self.grid_of(imgs))

    @property
    def global_pool(self) -> str:
        """timm's pooling for `pool`: "token" (the CLS token), "avg" (mean of patch tokens), ..."""
        return str(self.vit.global_pool)

    def pool(self, features: Tensor) -> Tensor:
        """timm's own pooling (CLS token or mean of patches, per `global_pool`): (B, P+N, D) -> (B, D)."""
        return self.vit.forward_head(features, pre_logits=True)

    def forward(self, imgs: Tensor) -> Tensor:
        """Pooled features: (B, C, H, W) -> (B, D)."""
        return self.pool(self.forward_features(imgs))

    @torch.no_grad()
    def forward_with_attention(self, imgs: Tensor) -> tuple[Tensor, Tensor]:
        """`forward_features(imgs)` plus the last block's attention probabilities.

        DINO (Caron et al. 2021, fig. 1) visualises the CLS token's attention in the last block. timm's
        fused attention never materialises the probabilities, so a forward hook on the last block's
        `attn` module recomputes softmax(q k^T * scale) from the module's own `qkv`, `q_norm` and
        `k_norm` on the hook's input. The hook returns nothing, so the forward itself is untouched.
        Returns features (B, P + N, D) and attention (B, heads, P + N, P + N).
        """
        attn = getattr(self.vit.blocks[-1], "attn", None)
        needed = ("qkv", "q_norm", "k_norm", "num_heads", "scale")
        if attn is None or not all(hasattr(attn, name) for name in needed):
            raise RecipeError(f"the last block of '{type(self.vit).__name__}' has no timm Attention module")
        recorded: list[Tensor] = []

        def record(module: Any, args: tuple[Tensor, ...], output: Tensor) -> None:
            qkv = rearrange(
                module.qkv(args[0]), "b n (three h d) -> three b h n d", three=3, h=module.num_heads
            )  # (3, B, heads, P+N, head_dim)
            q, k = module.q_norm(qkv[0]), module.k_norm(qkv[1])
            recorded.append(((q * module.scale) @ k.transpose(-2, -1)).softmax(dim=-1))  # (B, h, P+N, P+N)

        handle = attn.register_forward_hook(record)
        try:
            features = self.forward_features(imgs)
        finally:
            handle.remove()
        return features, recorded[0]

    def patch_tokens(self, features: Tensor) -> Tensor:
        """Drop the prefix tokens: (B, P + N, D) -> (B, N, D)."""
        return features[:, self.num_prefix_tokens :]

    def last_blocks_cls(self, imgs: Tensor, n: int = 4) -> Tensor:
        """CLS tokens of the last `n` blocks, each through the final norm, concatenated: (B, n*D).

        DINO's linear evaluation (Caron et al. 2021, `n_last_blocks=4` for ViT-S). A backbone with
        fewer than `n` blocks gives all of its blocks.
        """
        if self.num_prefix_tokens == 0:
            raise RecipeError("feature 'cls4' needs a class token; this backbone has none (use 'avg')")
        n = min(n, len(self.vit.blocks))
        per_block: list[tuple[Tensor, Tensor]] = self.vit.forward_intermediates(  # type: ignore[assignment]
            imgs, indices=n, return_prefix_tokens=True, norm=True, output_fmt="NLC", intermediates_only=True
        )  # n x ((B, N, D), (B, P, D))
        return torch.cat([prefix[:, 0] for _, prefix in per_block], dim=-1)  # (B, n*D)

    def set_drop_path(self, rate: float) -> None:
        """Stochastic depth (Huang et al. 2016) rising linearly from 0 to `rate` over the blocks, as timm
        builds it; fine-tuning turns it on for a backbone that was pretrained or exported without it."""
        depth = len(self.vit.blocks)
        for i, block in enumerate(self.vit.blocks):
            block_rate = rate * i / max(depth - 1, 1)
            for attr in ("drop_path1", "drop_path2"):
                if hasattr(block, attr):
                    setattr(block, attr, DropPath(block_rate) if block_rate > 0 else nn.Identity())

    def freeze_patch_embed(self, reinit: bool = False) -> None:
        """Stop gradients into the patch projection; with `reinit`, first redraw it xavier-uniform over
        the patch's fan-in and the width, bias zero, as MoCo v3's `vits.py` does (a fixed random
        projection is its cure for training instability, Chen et al. 2021, sec. 4.2)."""
        proj = self.vit.patch_embed.proj
        if reinit:
            with torch.no_grad():
                nn.init.xavier_uniform_(proj.weight.view(proj.out_channels, -1))  # bound over C*p*p + D
                if proj.bias is not None:
                    proj.bias.zero_()
        proj.requires_grad_(False)

    @property
    def num_layers(self) -> int:
        """Layers for layer-wise lr decay: the embeddings (layer 0) and one per block (1..depth); what
        comes after the blocks is layer `num_layers`, at the full lr."""
        return len(self.vit.blocks) + 1

    def layer_id(self, name: str) -> int:
        """Layer of parameter `name` (as `named_parameters()` names it) for layer-wise lr decay.

        BEiT (Bao et al. 2021, sec. 2.4) and MAE's `lr_decay.py`: 0 for the patch embedding, class and
        register tokens and position embedding, i + 1 for block i, `num_layers` for the final norm.
        """
        local = name.removeprefix("vit.")
        if local.split(".")[0] in _EMBEDDINGS:
            return 0
        block = _BLOCK.match(local)
        return int(block.group(1)) + 1 if block else self.num_layers

    def group_matcher(self, prefix: str = "") -> dict[str, Any]:
        """timm's layer grouping (stem, blocks, final norm) for parameter names under `prefix`.

        timm's layer-decay optimiser factory reads this from the model it is given; an objective that
        holds the backbone as `self.backbone` passes `prefix="backbone."`.
        """
        lead = "^" + (prefix + "vit.").replace(".", r"\.")

        def under(pattern: str) -> str:
            return f"{lead}(?:{pattern.lstrip('^')})"

        matcher = self.vit.group_matcher(coarse=False)
        return {
            name: [(under(p), suffix) for p, suffix in spec] if isinstance(spec, list) else under(spec)
            for name, spec in matcher.items()
        }

    def load_timm_weights(self, state: Mapping[str, Tensor]) -> LoadedWeights:
        """Copy timm ViT weights (keys as in `vit.state_dict()`, any subset) into this backbone.

        Shapes that differ only where a recipe may differ from the checkpoint are adapted with timm's
        own functions: the position embedding is resampled to this grid (`resample_abs_pos_embed`,
        bicubic, prefix positions kept), the patch projection to this channel count (`adapt_input_conv`:
        a sum over RGB for one channel) and patch size (FlexiViT's `resample_patch_embed`). A fixed
        sin-cos table is kept, not loaded: it is exact at any grid. A key this backbone lacks or any
        other shape mismatch is a one-line `CheckpointError` naming the key.
        """
        own = self.vit.state_dict()
        state = dict(state)
        unknown = sorted(set(state) - set(own))
        if unknown:
            raise CheckpointError(
                f"'{unknown[0]}' is not a weight of this backbone ({len(unknown)} such keys)"
            )
        notes: list[str] = []
        pos = self.vit.pos_embed
        fixed = {"pos_embed"} if pos is not None and not pos.requires_grad else set()
        if fixed and state.pop("pos_embed", None) is not None:
            notes.append("pos_embed not loaded: the recipe's fixed sin-cos table is kept")
        for key, value in list(state.items()):
            want = own[key]
            if tuple(value.shape) == tuple(want.shape):
                continue
            if key == "pos_embed":
                state[key] = self._resampled_pos_embed(value, want, notes)
            elif key == "patch_embed.proj.weight":
                state[key] = _adapted_patch_embed(value, want, notes)
            else:
                raise CheckpointError(
                    f"'{key}' has shape {tuple(value.shape)} in the checkpoint but the recipe's model has "
                    f"{tuple(want.shape)}; set model.embed_dim/depth/num_heads/mlp_ratio to the checkpoint's"
                )
        self.vit.load_state_dict(state, strict=False)
        return LoadedWeights(sorted(state), sorted(set(own) - set(state) - fixed), notes)

    def _resampled_pos_embed(self, value: Tensor, target: Tensor, notes: list[str]) -> Tensor:
        """(1, P + n*n, D) position embeddings -> this grid, the prefix rows kept as they are."""
        prefix = self._pos_prefix
        side = math.isqrt(max(value.shape[1] - prefix, 0))
        if value.ndim != 3 or side * side != value.shape[1] - prefix or value.shape[2] != target.shape[2]:
            raise CheckpointError(
                f"'pos_embed' has shape {tuple(value.shape)} in the checkpoint, which does not resample to "
                f"{tuple(target.shape)} ({prefix} prefix tokens + a square grid, same width)"
            )
        grid = list(self.grid_size)
        notes.append(f"pos_embed resampled from a {side}x{side} to a {grid[0]}x{grid[1]} grid (bicubic)")
        return resample_abs_pos_embed(value, new_size=grid, old_size=[side, side], num_prefix_tokens=prefix)

    def reset_parameters(self, seed: int) -> None:
        """Fresh weights with this backbone's initialisation scheme (the random-init baseline); the
        global RNG is left untouched. Fixed sin-cos position embeddings stay fixed."""
        pos = self.vit.pos_embed
        fixed_sincos = pos is not None and not pos.requires_grad
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.vit.init_weights()
            self._init_as(self.init_scheme)
        if fixed_sincos:
            self._set_fixed_sincos()

    def no_weight_decay(self) -> set[str]:
        """Names (relative to this module) that should get no weight decay."""
        return {f"vit.{n}" for n in self.vit.no_weight_decay()}


def _adapted_patch_embed(value: Tensor, target: Tensor, notes: list[str]) -> Tensor:
    """Patch projection weights (D, C, p, p) -> the target's channel count and patch size."""
    if value.ndim != 4 or value.shape[0] != target.shape[0]:
        raise CheckpointError(
            f"'patch_embed.proj.weight' has shape {tuple(value.shape)} in the checkpoint but the "
            f"recipe's model needs {tuple(target.shape)}; match model.embed_dim to the checkpoint"
        )
    if value.shape[1] != target.shape[1]:
        old_chans = value.shape[1]
        try:
            value = adapt_input_conv(int(target.shape[1]), value).to(target.dtype)
        except NotImplementedError:
            raise CheckpointError(
                f"'patch_embed.proj.weight' has {old_chans} input channels and cannot be adapted "
                f"to model.in_chans={target.shape[1]} (only 3-channel weights adapt to other counts)"
            ) from None
        how = "summed over channels" if target.shape[1] == 1 else "repeated and rescaled"
        notes.append(
            f"patch_embed.proj.weight {how}: {old_chans} -> {target.shape[1]} channels (adapt_input_conv)"
        )
    if tuple(value.shape[2:]) != tuple(target.shape[2:]):
        old = tuple(value.shape[2:])
        value = resample_patch_embed(value, list(target.shape[2:]))
        notes.append(
            f"patch_embed.proj.weight resized from {old} to {tuple(target.shape[2:])} patches (FlexiViT)"
        )
    return value
