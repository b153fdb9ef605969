"""iBOT: the block mask sampler, the patch loss against a loop, the CLS loss against DINO's, the mask
token before the blocks, the EMA teacher and centres, a fixed batch, the CLI."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from scipy import ndimage

from ssl_vit import objectives
from ssl_vit.backbone import Backbone
from ssl_vit.data import load_images
from ssl_vit.engine.ema import ema_update
from ssl_vit.errors import RecipeError
from ssl_vit.objectives.dino import dino_loss
from ssl_vit.objectives.ibot import IBOT, patch_loss
from ssl_vit.objectives.masking import block_mask, sample_masks
from ssl_vit.types import Batch
from tests.conftest import tiny_model_config, train_history

ASPECT = (0.3, 1 / 0.3)


def make(**options: object) -> IBOT:
    objective = objectives.build({"name": "ibot", **options}, Backbone.from_config(tiny_model_config()))
    assert isinstance(objective, IBOT)
    return objective


def fix_masks(objective: IBOT, masks: torch.Tensor) -> None:
    objective.masks = lambda *args, **kwargs: masks  # type: ignore[method-assign]


# ------------------------------------------------------------------ the mask sampler
def test_block_masks_stay_at_or_just_under_the_ratio() -> None:
    """At most ratio * N patches per draw (no rectangle may overshoot), and on the paper's 14x14 grid
    within a patch and a half of it on average (only a last rectangle that does not fit is missing)."""
    rng = random.Random(0)
    for grid in [(14, 14), (4, 4)]:
        n, shortfall = grid[0] * grid[1], []
        for _ in range(300):
            ratio = rng.uniform(0.1, 0.5)
            count = int(block_mask(grid, ratio, ASPECT, rng).sum())
            assert 0 < count <= ratio * n + 1e-9
            shortfall.append(ratio * n - count)
        assert sum(shortfall) / len(shortfall) < 1.5, grid


def test_only_the_configured_share_of_views_is_masked_at_ratios_in_range() -> None:
    """Over 2,000 views: the share of masked views is binomial around `probability` (5 sigma), and each
    masked view's share of patches lies in the range (the draw's ratio, less at most 6% of the grid for
    a last block that did not fit) with the range's mean on average."""
    masks = sample_masks(2000, (14, 14), 0.3, (0.2, 0.4), ASPECT, torch.Generator().manual_seed(0))
    assert masks.shape == (2000, 196) and masks.dtype == torch.bool
    share = masks.float().mean(dim=1)
    masked = share > 0
    assert abs(masked.float().mean().item() - 0.3) < 5 * math.sqrt(0.3 * 0.7 / 2000)
    assert share[masked].max() <= 0.4 and share[masked].min() >= 0.2 - 0.06
    assert abs(share[masked].mean().item() - 0.3) < 0.02  # U(0.2, 0.4) on average
    assert not sample_masks(50, (4, 4), 0.0, (0.1, 0.5), ASPECT).any()
    assert sample_masks(50, (4, 4), 1.0, (0.1, 0.5), ASPECT).any(dim=1).all()


def test_masks_are_blocks_not_scattered_patches() -> None:
    """A block mask is a few rectangles: few 4-connected regions, while the same number of patches
    scattered at random falls apart into many."""
    rng, generator = random.Random(0), torch.Generator().manual_seed(0)
    blocks, scattered = [], []
    for _ in range(200):
        mask = block_mask((14, 14), rng.uniform(0.1, 0.5), ASPECT, rng).numpy()
        blocks.append(ndimage.label(mask)[1])
        shuffled = torch.zeros(196, dtype=torch.bool)
        shuffled[torch.randperm(196, generator=generator)[: int(mask.sum())]] = True
        scattered.append(ndimage.label(shuffled.view(14, 14).numpy())[1])
    assert np.mean(blocks) < 3 and np.mean(scattered) > 10, (np.mean(blocks), np.mean(scattered))


def test_the_sampler_is_reproducible_from_torchs_generator() -> None:
    def draw(seed: int) -> torch.Tensor:
        return sample_masks(16, (8, 8), 0.5, (0.1, 0.5), ASPECT, torch.Generator().manual_seed(seed))

    assert torch.equal(draw(3), draw(3)) and not torch.equal(draw(3), draw(4))


@pytest.mark.parametrize(
    "options", [{"mask_ratio": [0.5, 0.2]}, {"mask_ratio": [0.0, 0.3]}, {"mask_probability": 1.5}]
)
def test_bad_mask_options_are_recipe_errors(options: dict[str, object]) -> None:
    with pytest.raises(RecipeError, match="mask"):
        make(**options)


# ------------------------------------------------------------------ the losses
def reference_patch_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    masks: torch.Tensor,
    center: torch.Tensor,
    tt: float,
    ts: float,
) -> float:
    """L_MIM by hand, student/teacher (V, B, N, K): per view and image, the mean over its masked patches
    of -sum_k P_t log P_s (teacher centred and sharpened, student at its temperature), 0 for an image
    without one; then the mean over images and views (the official iBOTLoss)."""
    views, batch, n, k = student.shape
    total = 0.0
    for v in range(views):
        for b in range(batch):
            masked = [i for i in range(n) if masks[v, b, i]]
            per_patch = []
            for i in masked:
                t = [math.exp((float(teacher[v, b, i, j]) - float(center[0, j])) / tt) for j in range(k)]
                s = [math.exp(float(student[v, b, i, j]) / ts) for j in range(k)]
                per_patch.append(-sum(t[j] / sum(t) * math.log(s[j] / sum(s)) for j in range(k)))
            total += sum(per_patch) / len(masked) if masked else 0.0
    return total / (views * batch)


def test_patch_loss_equals_a_loop_and_reads_masked_patches_only() -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 5, 6), torch.randn(2, 3, 5, 6)
    masks = torch.zeros(2, 3, 5, dtype=torch.bool)
    masks[0, 0, [1, 2]] = masks[0, 2, 4] = masks[1, 1, [0, 1, 2, 3]] = (
        True  # image (0, 1), (1, 0), (1, 2): none
    )
    center, tt, ts = torch.randn(1, 6) * 0.1, 0.05, 0.1

    flat = rearrange(masks, "v b n -> (v b) n")

    def loss(s: torch.Tensor) -> torch.Tensor:
        rows = "v b n k -> (v b) n k"
        return patch_loss(rearrange(s, rows)[flat], rearrange(teacher, rows)[flat], flat, center, tt, ts)

    assert loss(student).item() == pytest.approx(
        reference_patch_loss(student, teacher, masks, center, tt, ts)
    )
    inside = student.clone()
    inside[1, 1, 3, 0] += 1.0  # one logit: adding to all K would not change the softmax
    assert not torch.allclose(loss(inside), loss(student))


@pytest.mark.parametrize("head_bn", [True, False])
def test_the_student_scores_exactly_the_masked_patches(head_bn: bool) -> None:
    """`patch_logits` on the masked rows only equals the masked rows of the logits of every patch, with
    BatchNorm in the head (statistics over every patch) and without (the MLP on the masked rows alone)."""
    torch.manual_seed(0)
    objective = make(head_bn=head_bn).train()
    patches = torch.randn(6, 16, objective.backbone.embed_dim)
    rows = sample_masks(6, (4, 4), 0.7, (0.2, 0.5), ASPECT, torch.Generator().manual_seed(1))
    every = objective.patch_logits(objective.head, None, patches)
    some = objective.patch_logits(objective.head, None, patches, rows)
    assert every.shape == (6, 16, 1024) and some.shape == (int(rows.sum()), 1024)
    torch.testing.assert_close(some, every[rows])


def student_and_teacher(objective: IBOT, imgs: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """CLS and patch logits of the student on masked views and of the teacher on whole ones, built from
    the backbone's own `embed`/`encode` and the head applied token by token (no BatchNorm in the head)."""
    bb, head = objective.backbone, objective.head
    tokens = torch.where(masks[..., None], objective.mask_token, bb.embed(imgs))
    features = bb.encode(tokens)
    teacher = objective.teacher_backbone.forward_features(imgs)
    return (
        head(bb.pool(features)),
        head(bb.patch_tokens(features)),
        objective.teacher_head(bb.pool(teacher)),
        objective.teacher_head(bb.patch_tokens(teacher)),
    )


def test_the_loss_is_lambda1_dino_on_cls_plus_lambda2_patch_loss() -> None:
    """With fixed masks, the CLS part is `dino_loss` on the CLS logits (student of masked views, teacher
    of whole ones) and the patch part the hand-written L_MIM on the patch logits, weighted 0.5 and 2."""
    torch.manual_seed(0)
    objective = make(head_bn=False, lambda1=0.5, lambda2=2.0).eval()
    imgs = torch.randn(6, 1, 16, 16)
    masks = sample_masks(6, (4, 4), 0.7, (0.2, 0.5), ASPECT, torch.Generator().manual_seed(1))
    assert masks.any() and not masks.any(dim=1).all()  # masked views and whole ones
    fix_masks(objective, masks)
    with torch.no_grad():
        objective.center.normal_(0, 0.1)
        objective.center_patch.normal_(0, 0.1)
    loss, logs = objective(Batch(views=[imgs[:3], imgs[3:]], labels=None))
    with torch.no_grad():
        s_cls, s_patch, t_cls, t_patch = student_and_teacher(objective, imgs, masks)
    tt, ts = objective.teacher_temp, objective.cfg.student_temp
    cls = dino_loss(list(s_cls.chunk(2)), list(t_cls.chunk(2)), objective.center, tt, ts)
    torch.testing.assert_close(logs["cls_loss"], cls)
    two = "(v b) n k -> v b n k"
    patch = reference_patch_loss(
        rearrange(s_patch, two, v=2),
        rearrange(t_patch, two, v=2),
        rearrange(masks, "(v b) n -> v b n", v=2),
        objective.center_patch,
        objective.teacher_patch_temp,
        ts,
    )
    assert logs["patch_loss"].item() == pytest.approx(patch, rel=1e-4)
    torch.testing.assert_close(loss, 0.5 * cls + 2.0 * logs["patch_loss"])


def test_masked_patches_never_reach_the_student_and_local_crops_only_the_cls_loss() -> None:
    torch.manual_seed(0)
    objective = make(local_crops=2).eval()
    imgs, local = torch.randn(2, 1, 16, 16), torch.randn(2, 1, 8, 8)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, [0, 1, 4, 5]] = True  # the top-left 8x8 pixels of the first view
    fix_masks(objective, masks)
    bb = objective.backbone
    with torch.no_grad():
        student = bb.encode(bb.replace_tokens(bb.embed(imgs), masks, objective.mask_token))
        changed = imgs.clone()
        changed[0, :, :8, :8] += 5.0
        torch.testing.assert_close(
            bb.encode(bb.replace_tokens(bb.embed(changed), masks, objective.mask_token)), student
        )
        _, logs = objective(Batch(views=[imgs[:1], imgs[1:], local[:1], local[1:]], labels=None))
        _, other = objective(Batch(views=[imgs[:1], imgs[1:], local[:1], 2 * local[1:]], labels=None))
    assert torch.equal(other["patch_loss"], logs["patch_loss"])
    assert not torch.equal(other["cls_loss"], logs["cls_loss"])


# ------------------------------------------------------------------ teacher, centres, schedules
@pytest.mark.parametrize("shared_head", [True, False])
def test_the_teacher_gets_no_gradient_and_every_trainable_parameter_does(shared_head: bool) -> None:
    torch.manual_seed(0)
    objective = make(shared_head=shared_head, patch_out_dim=64, local_crops=2)
    objective.set_progress(10**6, 10**7, 10)  # past the frozen last layers
    views = [
        torch.randn(8, 1, 16, 16),
        torch.randn(8, 1, 16, 16),
        torch.randn(8, 1, 8, 8),
        torch.randn(8, 1, 8, 8),
    ]
    loss, _ = objective(Batch(views=views, labels=None))
    loss.backward()
    teachers = {id(p) for _, teacher in objective.ema_pairs() for p in teacher.parameters()}
    assert len(objective.ema_pairs()) == (2 if shared_head else 3)
    for name, param in objective.named_parameters():
        if id(param) in teachers:
            assert not param.requires_grad and param.grad is None, name
        else:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert (objective.patch_head is None) == shared_head
    assert objective.center_patch.shape == (1, 1024 if shared_head else 64)
    with torch.no_grad():
        for online, _ in objective.ema_pairs():
            for p in online.parameters():
                p.add_(1.0)
    before = {id(t): {k: v.clone() for k, v in t.state_dict().items()} for _, t in objective.ema_pairs()}
    ema_update(objective.ema_pairs(), 0.9)
    for online, teacher in objective.ema_pairs():
        params = dict(online.named_parameters())
        for key, value in teacher.named_parameters():
            torch.testing.assert_close(value, 0.9 * before[id(teacher)][key] + 0.1 * params[key])


def test_centres_move_after_the_step_and_temperatures_warm_up_apart() -> None:
    """c <- 0.9 c + 0.1 mean(teacher CLS logits); the patch centre the same over every patch logit;
    forward leaves both alone. The patch temperature follows its own warm-up line."""
    torch.manual_seed(0)
    objective = make(
        warmup_teacher_temp=0.02,
        teacher_temp=0.04,
        warmup_teacher_patch_temp=0.04,
        teacher_patch_temp=0.08,
        warmup_teacher_temp_epochs=4.0,
        warmup_teacher_temp_per="step",
    )
    objective.set_progress(10, 100, 10)  # epoch 1 of 4
    assert objective.teacher_temp == pytest.approx(0.025)
    assert objective.teacher_patch_temp == pytest.approx(0.05)
    imgs = torch.randn(4, 1, 16, 16)
    batch = Batch(views=[imgs[:2], imgs[2:]], labels=None)
    with torch.no_grad():
        objective.center.normal_()
        objective.center_patch.normal_()
    center, center_patch = objective.center.clone(), objective.center_patch.clone()
    objective(batch)
    assert torch.equal(objective.center, center) and torch.equal(objective.center_patch, center_patch)
    with torch.no_grad():
        features = objective.teacher_backbone.forward_features(imgs)
        bb, head = objective.backbone, objective.teacher_head
        cls = head(bb.pool(features))  # (4, K)
        patches = head.last_layer(F.normalize(head.mlp(bb.patch_tokens(features).flatten(0, 1)), dim=-1))
    objective.after_optimizer_step()
    torch.testing.assert_close(objective.center, 0.9 * center + 0.1 * cls.mean(0, keepdim=True))
    torch.testing.assert_close(
        objective.center_patch, 0.9 * center_patch + 0.1 * patches.mean(0, keepdim=True)
    )


def test_overfits_a_fixed_tiny_batch() -> None:
    """16 digits, fixed masks on every view, a frozen teacher and centres (momenta 1): the targets are
    fixed, so the loss must fall by what the student learns, its KL terms (measured 2.97 -> 1.40 in 30
    steps; the loss itself 12.7 -> 11.1)."""
    torch.manual_seed(0)
    objective = make(momentum=1.0, center_momentum=1.0, center_patch_momentum=1.0, mask_probability=1.0)
    images, _ = load_images("digits", "train", 16, 1)
    x = (images[:16].float() - 0.5) / 0.5
    fix_masks(objective, objective.masks(32, (4, 4), torch.device("cpu")))
    history = train_history(objective, Batch(views=[x, x.flip(-1)], labels=None), 30)
    losses, kl = history["loss"], history["kl"]
    assert kl[-1] < 0.6 * kl[0] and losses[-1] < losses[0] - 1.0, (losses, kl)
