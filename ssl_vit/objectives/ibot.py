"""iBOT (Zhou et al. 2022, "iBOT: Image BERT Pre-Training with Online Tokenizer")."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_vit.backbone import Backbone
from ssl_vit.errors import RecipeError
from ssl_vit.objectives import register
from ssl_vit.objectives._shared import cosine_momentum
from ssl_vit.objectives.base import Objective
from ssl_vit.objectives.dino import (
    CenterUpdate,
    DINOConfig,
    DINOHead,
    WeightNormLinear,
    check_config,
    dino_loss,
    multi_crop_views,
    teacher_entropy,
    warmup_temperature,
)
from ssl_vit.objectives.masking import sample_masks
from ssl_vit.types import Batch, ViewSpec


@dataclass
class IBOTConfig(DINOConfig):
    """DINO's options (head, CLS temperatures, centring, crops, teacher EMA) plus the masked-patch branch.

    Defaults follow the official `main_ibot.py` where it differs from DINO's: no local crops, global
    crops of 14-100%, a patch teacher temperature 0.04 -> 0.07 over 30 epochs. Half of the global views
    are masked, each with a ratio drawn from [0.1, 0.5] (the official `--pred_ratio 0 0.3
    --pred_ratio_var 0 0.2` of every published model), in BEiT's blocks of aspect ratio 0.3-3.3.
    The head is DINO's, sized for the small recipes (the paper: out_dim 8192, shared).
    """

    local_crops: int = 0
    global_scale: list[float] = field(default_factory=lambda: [0.14, 1.0])
    warmup_teacher_temp_epochs: float = 30.0
    # Patch logits from the CLS head's last layer (official `--shared_head`); otherwise a last layer of
    # `patch_out_dim` prototypes of its own on the same MLP, as the official `iBOTHead`.
    shared_head: bool = True
    patch_out_dim: int = 1024
    teacher_patch_temp: float = 0.07
    warmup_teacher_patch_temp: float = 0.04  # warms up over `warmup_teacher_temp_epochs` too
    center_patch_momentum: float = 0.9
    mask_probability: float = 0.5  # share of global views that are masked at all
    mask_ratio: list[float] = field(default_factory=lambda: [0.1, 0.5])  # of a masked view's patches
    mask_aspect: list[float] = field(default_factory=lambda: [0.3, 1 / 0.3])  # of each block, h / w
    lambda1: float = 1.0  # weight of the CLS (DINO) loss
    lambda2: float = 1.0  # weight of the masked-patch loss


def per_image_mean(values: Tensor, masks: Tensor) -> Tensor:
    """values (M,) of the masked patches of `masks` (B, N), in `tensor[masks]` order, averaged per image
    over its masked patches, then over images; an image with none masked counts as 0 (the official
    `iBOTLoss`, so the loss scales with the share of masked images)."""
    image = masks.nonzero()[:, 0]
    sums = values.new_zeros(masks.shape[0]).index_add(0, image, values)
    return (sums / masks.sum(-1).clamp_min(1)).mean()


def patch_entropy(teacher: Tensor, masks: Tensor, center: Tensor, teacher_temp: float) -> Tensor:
    """Entropy of the teacher's distributions on the masked patches (M, K), weighted as `patch_loss`: its
    H(P_t) part, logged to watch the patch targets for collapse as DINO's `teacher_entropy` watches the
    CLS ones."""
    q = F.softmax((teacher.float() - center) / teacher_temp, dim=-1)
    return per_image_mean(-(q * torch.log(q.clamp_min(1e-12))).sum(-1), masks)


def patch_loss(
    student: Tensor,
    teacher: Tensor,
    masks: Tensor,
    center: Tensor,
    teacher_temp: float,
    student_temp: float,
) -> Tensor:
    """L_MIM (sec. 3.2): the cross-entropy between the teacher's centred, sharpened distribution of each
    masked patch of the whole view and the student's of the masked view, per image over its masked
    patches, then over the images of every global view.

    student, teacher: (M, K) logits of the masked patches of `masks` (V*B, N), in `tensor[masks]` order:
    the other patches do not enter the loss, so they are never scored (`IBOT.patch_logits`). Same view for
    both, unlike the CLS loss: the teacher is the online tokenizer of the very patches the student cannot
    see.
    """
    q = F.softmax((teacher.float() - center) / teacher_temp, dim=-1)
    return per_image_mean(-(q * F.log_softmax(student.float() / student_temp, dim=-1)).sum(-1), masks)


@register("ibot")
class IBOT(Objective):
    """DINO's CLS self-distillation plus masked-patch self-distillation against the same EMA teacher.

    The student sees the 2 global crops with blockwise-masked patch embeddings replaced by a learned
    mask token before the blocks (`Backbone.replace_tokens`), and any local crops unmasked (they only
    enter the CLS loss); the teacher, EMA of backbone and heads, sees the global crops whole. Loss =
    lambda1 * DINO's cross-view CLS loss + lambda2 * `patch_loss`, each with its own centre (`center`,
    `center_patch`) and teacher temperature schedule.
    """

    Config = IBOTConfig
    # The paper evaluates the teacher, as DINO (official `run.sh ... teacher`, "generally better").
    export_weights = "teacher"
    teacher_in_eval = True
    center: Tensor  # buffers (1, K) and (1, K_patch)
    center_patch: Tensor

    def __init__(self, backbone: Backbone, cfg: IBOTConfig) -> None:
        super().__init__(backbone)
        check_config(cfg)
        ratio = cfg.mask_ratio
        if not 0.0 <= cfg.mask_probability <= 1.0 or len(ratio) != 2 or not 0.0 < ratio[0] <= ratio[1] < 1.0:
            raise RecipeError(
                "objective: mask_probability must be in [0, 1], mask_ratio [min, max] in (0, 1)"
            )
        if len(cfg.mask_aspect) != 2 or not 0 < cfg.mask_aspect[0] <= cfg.mask_aspect[1]:
            raise RecipeError("objective.mask_aspect is [min, max] block h / w, both > 0")
        if min(cfg.teacher_patch_temp, cfg.warmup_teacher_patch_temp) <= 0:
            raise RecipeError("objective: teacher_patch_temp and warmup_teacher_patch_temp must be positive")
        self.cfg = cfg
        self.head = DINOHead(backbone.embed_dim, cfg)
        patch_dim = cfg.out_dim if cfg.shared_head else cfg.patch_out_dim
        self.patch_head = (
            None if cfg.shared_head else WeightNormLinear(cfg.bottleneck_dim, patch_dim, cfg.norm_last_layer)
        )
        self.mask_token = nn.Parameter(torch.zeros(backbone.embed_dim))  # zeros, as the official code
        self.teacher_backbone = copy.deepcopy(backbone).requires_grad_(False)
        self.teacher_head = copy.deepcopy(self.head).requires_grad_(False)
        self.teacher_patch_head = copy.deepcopy(self.patch_head)
        if self.teacher_patch_head is not None:
            self.teacher_patch_head.requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))
        self.register_buffer("center_patch", torch.zeros(1, patch_dim))
        self.spec = multi_crop_views(backbone, cfg)
        self.teacher_temp, self.teacher_patch_temp = cfg.warmup_teacher_temp, cfg.warmup_teacher_patch_temp
        self.epoch = 0.0
        self.center_update, self.center_patch_update = CenterUpdate(), CenterUpdate()

    def views(self) -> ViewSpec:
        return self.spec

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        pairs: list[tuple[nn.Module, nn.Module]] = [
            (self.backbone, self.teacher_backbone),
            (self.head, self.teacher_head),
        ]
        if self.patch_head is not None and self.teacher_patch_head is not None:
            pairs.append((self.patch_head, self.teacher_patch_head))
        return pairs

    def ema_momentum(self, step: int, total_steps: int) -> float:
        return cosine_momentum(self.cfg.momentum, step, total_steps)

    def set_progress(self, step: int, total_steps: int, steps_per_epoch: int) -> None:
        cfg = self.cfg
        self.epoch = step / max(steps_per_epoch, 1)
        warm, per = cfg.warmup_teacher_temp_epochs, cfg.warmup_teacher_temp_per
        self.teacher_temp = warmup_temperature(
            self.epoch, cfg.warmup_teacher_temp, cfg.teacher_temp, warm, per
        )
        self.teacher_patch_temp = warmup_temperature(
            self.epoch, cfg.warmup_teacher_patch_temp, cfg.teacher_patch_temp, warm, per
        )

    def masks(self, n: int, grid: tuple[int, int], device: torch.device) -> Tensor:
        """(n, h*w) bool masks of the global views, True = masked (`sample_masks` with this recipe)."""
        cfg = self.cfg
        ratio, aspect = (cfg.mask_ratio[0], cfg.mask_ratio[1]), (cfg.mask_aspect[0], cfg.mask_aspect[1])
        return sample_masks(n, grid, cfg.mask_probability, ratio, aspect).to(device)

    def patch_logits(
        self, head: DINOHead, patch_head: nn.Module | None, patches: Tensor, rows: Tensor | None = None
    ) -> Tensor:
        """Patch tokens (B, N, D) -> logits (B, N, K_patch), or (M, K_patch) for the `rows` (B, N) only.

        Pooled and patch tokens pass the head's MLP in separate calls. Without BatchNorm (the official
        heads) that equals the official `iBOTHead`'s one call on all tokens; with `head_bn` each kind
        keeps its own batch statistics, so the CLS branch stays DINO's head (with one call, the CLS
        tokens one row in 1 + N of the statistics, the digits recipe's centred CLS teacher stayed near
        uniform longer). The student scores only the masked patches, the only ones its loss reads: the
        MLP still sees every patch where its BatchNorm needs them, the last layer (row-wise) only those.
        """
        last = patch_head if patch_head is not None else head.last_layer
        if rows is None:
            return last(head.bottleneck(patches.flatten(0, 1))).unflatten(0, patches.shape[:2])
        if self.cfg.head_bn:
            return last(head.bottleneck(patches.flatten(0, 1))[rows.flatten()])
        return last(head.bottleneck(patches[rows]))

    def forward(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        bb, cfg, views = self.backbone, self.cfg, len(batch.views)
        globals_ = torch.cat(batch.views[:2])  # (2B, C, H, W)
        grid = bb.grid_of(globals_)
        masks = self.masks(globals_.shape[0], grid, globals_.device)  # (2B, N)
        tokens = bb.replace_tokens(bb.embed(globals_), masks, self.mask_token)  # (2B, N, D)
        student = bb.encode(tokens, grid=grid)
        student_cls = self.head(bb.pool(student))  # (2B, K)
        student_patch = self.patch_logits(
            self.head, self.patch_head, bb.patch_tokens(student), masks
        )  # (M, K)
        if views > 2:  # local crops: unmasked, CLS loss only
            local_cls = self.head(bb(torch.cat(batch.views[2:])))  # (L*B, K)
            student_cls = torch.cat([student_cls, local_cls])  # ((2 + L) * B, K)
        with torch.no_grad():
            teacher = self.teacher_backbone.forward_features(globals_)  # (2B, P + N, D)
            teacher_cls = self.teacher_head(self.teacher_backbone.pool(teacher))
            teacher_patches = self.patch_logits(
                self.teacher_head, self.teacher_patch_head, self.teacher_backbone.patch_tokens(teacher)
            )  # (2B, N, K): every patch, for the centre
        if self.training:  # recorded here, applied in after_optimizer_step
            self.center_update.record(teacher_cls)
            self.center_patch_update.record(teacher_patches.flatten(0, 1))
        teacher_patch = teacher_patches[masks]  # (M, K)
        teacher_views = list(teacher_cls.chunk(2))
        cls_loss = dino_loss(
            list(student_cls.chunk(views)), teacher_views, self.center, self.teacher_temp, cfg.student_temp
        )
        temp_patch = self.teacher_patch_temp
        mim_loss = patch_loss(
            student_patch, teacher_patch, masks, self.center_patch, temp_patch, cfg.student_temp
        )
        loss = cfg.lambda1 * cls_loss + cfg.lambda2 * mim_loss
        entropy = teacher_entropy(teacher_views, self.center, self.teacher_temp)
        entropy_patch = patch_entropy(teacher_patch, masks, self.center_patch, temp_patch)
        logs = {
            "cls_loss": cls_loss.detach(),
            "patch_loss": mim_loss.detach(),
            "masked": masks.float().mean(),
            "teacher_temp": torch.tensor(self.teacher_temp),
            "teacher_patch_temp": torch.tensor(temp_patch),
            "teacher_entropy": entropy,
            "teacher_patch_entropy": entropy_patch,
            # the loss less its teacher entropies: the KL(P_t || P_s) terms, what the student learns
            "kl": loss.detach() - cfg.lambda1 * entropy - cfg.lambda2 * entropy_patch,
        }
        return loss, logs

    def after_backward(self) -> None:
        """The last layers' gradients are dropped in the first `freeze_last_layer_epochs` (DINO app. D)."""
        if self.epoch < self.cfg.freeze_last_layer_epochs:
            for layer in (self.head.last_layer, self.patch_head):
                for param in layer.parameters() if layer is not None else ():
                    param.grad = None

    def after_skipped_step(self) -> None:
        self.center_update.forget()
        self.center_patch_update.forget()

    def after_optimizer_step(self) -> None:
        """Both centres move towards this step's teacher outputs (DINO eq. 4; the patch centre over
        every patch of every global view, as the official `iBOTLoss.update_center`)."""
        self.center_update.apply(self.center, self.cfg.center_momentum)
        self.center_patch_update.apply(self.center_patch, self.cfg.center_patch_momentum)
