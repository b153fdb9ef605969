"""DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers")."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_vit.backbone import Backbone
from ssl_vit.errors import RecipeError
from ssl_vit.objectives import register
from ssl_vit.objectives._shared import all_reduce_mean, cosine_momentum, init_linear, mlp
from ssl_vit.objectives.base import Objective
from ssl_vit.types import Batch, ViewSpec


@dataclass
class DINOConfig:
    """Defaults follow the official `main_dino.py` except the head, which is sized for the small
    recipes (the paper: out_dim 65536, hidden 2048, bottleneck 256, no BatchNorm; see
    `recipes/imagenet/vit_b16_dino.yaml`).

    `head_bn` (the official `use_bn_in_head`, off for ImageNet) is on by default: a small random ViT
    maps different images to nearly the same feature, so after centring the teacher's targets are
    uniform and training collapses to the uniform output (measured on digits: loss stuck at
    log K, k-NN at chance level of the random init). BatchNorm in the head removes that common
    component and lets the centred targets differ from the start (digits k-NN 69% after 300 steps).
    """

    out_dim: int = 1024
    hidden_dim: int = 512
    bottleneck_dim: int = 128
    head_layers: int = 3
    head_bn: bool = True  # official `use_bn_in_head` (off there); see above
    # head_bn's statistics over every process's crops: the official `main_dino.py` converts student
    # and teacher with `nn.SyncBatchNorm.convert_sync_batchnorm` when the head has BatchNorm
    global_bn: bool = True
    norm_last_layer: bool = True
    freeze_last_layer_epochs: float = 1.0
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: float = 0.0
    warmup_teacher_temp_per: str = "epoch"  # epoch: the official schedule | step: smooth, for short runs
    center_momentum: float = 0.9
    momentum: float = 0.996  # teacher EMA, raised to 1 along a cosine
    local_crops: int = 8
    local_size: int | None = None  # default: 96/224 of the image size, in whole patches
    global_scale: list[float] = field(default_factory=lambda: [0.4, 1.0])
    local_scale: list[float] = field(default_factory=lambda: [0.05, 0.4])


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight normalisation, w = g * v / ||v|| per output unit.

    DINO's last layer; with `norm_last_layer` g is fixed at 1 (a buffer), which the paper reports
    stabilises training (appendix D). Written out instead of `nn.utils.weight_norm` so the teacher
    copy and the EMA see two plain tensors.
    """

    def __init__(self, in_dim: int, out_dim: int, fix_norm: bool) -> None:
        super().__init__()
        self.v = nn.Parameter(nn.Linear(in_dim, out_dim, bias=False).weight.detach().clone())  # (K, d)
        g = torch.ones(out_dim, 1)
        if fix_norm:
            self.register_buffer("g", g)
        else:
            self.g = nn.Parameter(g)

    def forward(self, x: Tensor) -> Tensor:
        # x @ (g * v / ||v||).T, scaling the (B, K) output instead of the (K, d) weight: with K = 65536
        # the normalised weight would cost more memory passes than the matmul itself at small batches.
        scale = self.g.squeeze(1) / self.v.norm(dim=1).clamp_min(1e-12)  # (K,)
        return F.linear(x, self.v) * scale.to(x.dtype)  # (B, K)


class DINOHead(nn.Module):
    """MLP -> L2-normalised bottleneck -> weight-normalised linear to K prototypes (sec. 3.1)."""

    def __init__(self, in_dim: int, cfg: DINOConfig) -> None:
        super().__init__()
        self.mlp = mlp(
            in_dim,
            cfg.hidden_dim,
            cfg.bottleneck_dim,
            cfg.head_layers,
            norm=cfg.head_bn,
            act=nn.GELU,
            global_bn=cfg.global_bn,
        )
        init_linear(self.mlp)
        self.last_layer = WeightNormLinear(cfg.bottleneck_dim, cfg.out_dim, cfg.norm_last_layer)

    def bottleneck(self, x: Tensor) -> Tensor:
        """The L2-normalised MLP output the last layer reads: (B, D) -> (B, d)."""
        return F.normalize(self.mlp(x), dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        return self.last_layer(self.bottleneck(x))  # (B, D) -> (B, K)


def warmup_temperature(epoch: float, start: float, end: float, warm_epochs: float, per: str) -> float:
    """Teacher temperature: linear warm-up from `start` to `end` over `warm_epochs`, then constant
    (paper, implementation details: 0.04 -> 0.07 over the first 30 epochs).

    `per="epoch"` as the official `main_dino.py` (`DINOLoss.teacher_temp_schedule`): epoch e gets entry
    e of `np.linspace(start, end, warm_epochs)`, so the final value is reached in the last warm-up
    epoch. `per="step"` follows the same line continuously, reaching `end` when the warm-up ends.
    """
    if epoch >= warm_epochs:
        return end
    if per == "step":
        return start + (end - start) * epoch / warm_epochs
    entries = math.ceil(warm_epochs)  # linspace points, one per warm-up epoch
    if entries == 1:
        return start
    return start + (end - start) * math.floor(epoch) / (entries - 1)


class CenterUpdate:
    """Teacher outputs recorded during forward, applied to a centre after the optimiser step (eq. 4).

    c <- m * c + (1 - m) * mean of the recorded outputs over all processes. Recording in `forward` and
    applying in `after_optimizer_step` keeps the centre fixed within a step (and across gradient
    accumulation's micro-batches); a skipped step's outputs are forgotten, as they may hold the NaN.
    """

    def __init__(self) -> None:
        self.total: Tensor | None = None  # (1, K) sum of the rows recorded since the last update
        self.count = 0

    def record(self, teacher: Tensor) -> None:
        """Add teacher outputs (n, K) to the running sum."""
        total = teacher.detach().float().sum(dim=0, keepdim=True)
        self.total = total if self.total is None else self.total + total
        self.count += teacher.shape[0]

    def forget(self) -> None:
        self.total, self.count = None, 0

    @torch.no_grad()
    def apply(self, center: Tensor, momentum: float) -> None:
        """Move `center` (1, K) in place towards the recorded mean; nothing when nothing was recorded."""
        if self.total is None:
            return
        batch_center = all_reduce_mean(self.total / self.count)
        center.mul_(momentum).add_(batch_center.view_as(center), alpha=1 - momentum)
        self.forget()


def teacher_entropy(teacher: list[Tensor], center: Tensor, teacher_temp: float) -> Tensor:
    """Mean entropy H(P_t) of the centred, sharpened teacher outputs.

    Caron et al. (sec. 5.3) split the loss as H(P_t, P_s) = H(P_t) + KL(P_t || P_s) to watch for
    collapse: uniform collapse drives H(P_t) to log K, one-hot collapse drives it to 0, and in both
    KL goes to 0. Logged, never trained on.
    """
    probs = [F.softmax((t.float() - center) / teacher_temp, dim=-1) for t in teacher]
    return torch.stack([-(q * torch.log(q.clamp_min(1e-12))).sum(-1).mean() for q in probs]).mean()


def dino_loss(
    student: list[Tensor], teacher: list[Tensor], center: Tensor, teacher_temp: float, student_temp: float
) -> Tensor:
    """Cross-entropy H(P_t, P_s) averaged over all (teacher view, other student view) pairs (eq. 3).

    student: one (B, K) output per view (globals first); teacher: (B, K) per global view. The
    teacher's outputs are centred and sharpened: softmax((t - c) / tau_t).
    """
    probs = [F.softmax((t.float() - center) / teacher_temp, dim=-1) for t in teacher]
    log_ps = [F.log_softmax(s.float() / student_temp, dim=-1) for s in student]
    total, terms = student[0].new_zeros((), dtype=torch.float32), 0
    for iq, q in enumerate(probs):
        for v, log_p in enumerate(log_ps):
            if v != iq:  # never the same view for teacher and student
                total = total + (-q * log_p).sum(dim=-1).mean()
                terms += 1
    return total / terms


def check_config(cfg: DINOConfig) -> None:
    """Raise `RecipeError` for crop counts, temperatures or crop scales DINO cannot use."""
    if cfg.local_crops < 0 or cfg.student_temp <= 0 or min(cfg.teacher_temp, cfg.warmup_teacher_temp) <= 0:
        raise RecipeError("objective: local_crops must be >= 0 and the temperatures positive")
    if cfg.warmup_teacher_temp_per not in ("epoch", "step"):
        raise RecipeError("objective.warmup_teacher_temp_per must be 'epoch' or 'step'")
    if len(cfg.global_scale) != 2 or len(cfg.local_scale) != 2:
        raise RecipeError("objective.global_scale and local_scale are [min, max] area fractions")


def multi_crop_views(backbone: Backbone, cfg: DINOConfig) -> ViewSpec:
    """2 global crops at the model's size and `local_crops` small ones, by default 96/224 of the image
    size in whole patches (the paper's 96 px at 224)."""
    patch, size = backbone.patch_size, backbone.grid_size[0] * backbone.patch_size
    local_size = cfg.local_size or max(round(size * 96 / 224 / patch), 1) * patch
    return ViewSpec(
        kind="contrastive",
        global_views=2,
        local_views=cfg.local_crops,
        local_size=local_size,
        global_scale=(cfg.global_scale[0], cfg.global_scale[1]),
        local_scale=(cfg.local_scale[0], cfg.local_scale[1]),
    )


@register("dino")
class DINO(Objective):
    """A student matches an EMA teacher's centred, sharpened outputs across multi-crop views.

    Teacher = EMA of the whole student branch, backbone and head (`ema_pairs`), momentum 0.996 -> 1
    along a cosine. The teacher sees the 2 global crops; the student all crops, the local ones at
    their own small resolution (the backbone resamples its position embeddings), which is what
    keeps multi-crop cheap in memory. The centre (a running mean of teacher outputs, over all
    processes) is updated after each optimiser step from the outputs this step recorded; the
    teacher temperature warms up linearly over `warmup_teacher_temp_epochs`, one value per epoch as
    the official code (or per step, for runs of few epochs); the last
    layer's gradients are dropped during the first `freeze_last_layer_epochs` (appendix D).
    """

    Config = DINOConfig
    # The paper evaluates the teacher ("the teacher has better performance than the student", sec. 3.1;
    # `eval_linear.py --checkpoint_key teacher`), so an export writes the teacher.
    export_weights = "teacher"
    teacher_in_eval = True
    center: Tensor  # buffer (1, K)

    def __init__(self, backbone: Backbone, cfg: DINOConfig) -> None:
        super().__init__(backbone)
        check_config(cfg)
        self.cfg = cfg
        self.head = DINOHead(backbone.embed_dim, cfg)
        self.teacher_backbone = copy.deepcopy(backbone).requires_grad_(False)
        self.teacher_head = copy.deepcopy(self.head).requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))
        self.spec = multi_crop_views(backbone, cfg)
        self.teacher_temp = cfg.warmup_teacher_temp
        self.epoch = 0.0
        self.center_update = CenterUpdate()  # teacher outputs recorded since the last update

    def views(self) -> ViewSpec:
        return self.spec

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.teacher_backbone), (self.head, self.teacher_head)]

    def ema_momentum(self, step: int, total_steps: int) -> float:
        return cosine_momentum(self.cfg.momentum, step, total_steps)

    def teacher_temperature(self, epoch: float) -> float:
        """The teacher temperature at `epoch` (`warmup_temperature` with this recipe's values)."""
        cfg = self.cfg
        return warmup_temperature(
            epoch,
            cfg.warmup_teacher_temp,
            cfg.teacher_temp,
            cfg.warmup_teacher_temp_epochs,
            cfg.warmup_teacher_temp_per,
        )

    def set_progress(self, step: int, total_steps: int, steps_per_epoch: int) -> None:
        self.epoch = step / max(steps_per_epoch, 1)
        self.teacher_temp = self.teacher_temperature(self.epoch)

    def forward(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        views = len(batch.views)
        globals_ = torch.cat(batch.views[:2])  # (2B, C, H, W)
        feats = [self.backbone(globals_)]  # (2B, D)
        if views > 2:  # local crops at their own resolution: fewer tokens, less memory
            feats.append(self.backbone(torch.cat(batch.views[2:])))  # (L*B, D)
        student = self.head(torch.cat(feats))  # ((2 + L) * B, K)
        with torch.no_grad():
            teacher = self.teacher_head(self.teacher_backbone(globals_))  # (2B, K)
        if self.training:  # recorded here, applied in after_optimizer_step
            self.center_update.record(teacher)
        loss = dino_loss(
            list(student.chunk(views)),
            list(teacher.chunk(2)),
            self.center,
            self.teacher_temp,
            self.cfg.student_temp,
        )
        # Each teacher view meets the same number of student views, so the pair mean of H(P_t, P_s)
        # minus the mean teacher entropy is the pair mean of KL(P_t || P_s).
        entropy = teacher_entropy(list(teacher.chunk(2)), self.center, self.teacher_temp)
        logs = {
            "teacher_temp": torch.tensor(self.teacher_temp),
            "teacher_entropy": entropy,
            "kl": loss.detach() - entropy,
        }
        return loss, logs

    def after_backward(self) -> None:
        if self.epoch < self.cfg.freeze_last_layer_epochs:
            for param in self.head.last_layer.parameters():
                param.grad = None

    def after_skipped_step(self) -> None:
        """A skipped step's teacher outputs never reach the centre (they may hold the NaN)."""
        self.center_update.forget()

    def after_optimizer_step(self) -> None:
        """c <- m * c + (1 - m) * mean of this step's teacher outputs over all processes (eq. 4)."""
        self.center_update.apply(self.center, self.cfg.center_momentum)
