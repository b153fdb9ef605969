"""The objectives' maths against slow, loop-based references written here from the papers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ssl_vit import objectives
from ssl_vit.backbone import Backbone
from ssl_vit.objectives.dino import DINO, dino_loss
from ssl_vit.objectives.mae import MAE, random_masking
from ssl_vit.objectives.mocov3 import moco_loss
from ssl_vit.objectives.mpp import KEPT, MASKED, MPP, RANDOM, UNTOUCHED
from ssl_vit.objectives.simclr import nt_xent
from ssl_vit.types import Batch
from tests.conftest import tiny_model_config


def build(name: str, **options: object) -> objectives.Objective:
    backbone = Backbone.from_config(tiny_model_config(**options.pop("model", {})))  # type: ignore[arg-type]
    return objectives.build({"name": name, **options}, backbone, num_classes=10)


# ------------------------------------------------------------------ MPP
def test_mpp_corrupts_half_with_80_10_10_split() -> None:
    mpp = build("mpp")
    assert isinstance(mpp, MPP)
    kind = mpp.corruption(400, 64, torch.device("cpu"))
    corrupted = kind != UNTOUCHED
    assert (corrupted.sum(1) == 32).all()  # exactly 50% per sample
    n = corrupted.sum().item()  # 12,800 corrupted patches: one sd of a 10% share is 0.27%
    shares = [((kind == k).sum().item() / n) for k in (MASKED, RANDOM, KEPT)]
    assert abs(shares[0] - 0.8) < 0.015 and abs(shares[1] - 0.1) < 0.015 and abs(shares[2] - 0.1) < 0.015
    # the corrupted positions are uniform over the grid
    per_position = corrupted.float().mean(0)
    assert (per_position - 0.5).abs().max() < 0.1


def test_mpp_corrupt_applies_mask_token_and_other_patches() -> None:
    mpp = build("mpp")
    assert isinstance(mpp, MPP)
    tokens = torch.randn(6, 16, 32)
    kind = mpp.corruption(6, 16, torch.device("cpu"))
    out = mpp.corrupt(tokens, kind)
    flat = tokens.reshape(-1, 32)
    for b in range(6):
        for i in range(16):
            k = int(kind[b, i])
            if k in (UNTOUCHED, KEPT):
                assert torch.equal(out[b, i], tokens[b, i])
            elif k == MASKED:
                assert torch.equal(out[b, i], mpp.mask_token.detach())
            else:
                match = [j for j in range(flat.shape[0]) if torch.equal(out[b, i], flat[j])]
                assert len(match) == 1 and match[0] != b * 16 + i  # another patch, never itself


def _loop_classes(pixels: torch.Tensor, patch: int, side: int, bits: int) -> torch.Tensor:
    """(C, H, W) in [0, 1] -> (N, side*side) classes, by hand: average each cell, quantise, combine."""
    chans, height, width = pixels.shape
    levels, cell = 2**bits, patch // side
    out = []
    for py in range(height // patch):
        for px in range(width // patch):
            row = []
            for sy in range(side):
                for sx in range(side):
                    cls = 0
                    for c in range(chans):
                        total = 0.0
                        for y in range(cell):
                            for x in range(cell):
                                total += float(
                                    pixels[c, py * patch + sy * cell + y, px * patch + sx * cell + x]
                                )
                        level = min(int(total / cell**2 * levels), levels - 1)
                        cls = cls * levels + level
                    row.append(cls)
            out.append(row)
    return torch.tensor(out)


def test_mpp_3bit_mean_colour_of_hand_made_patches() -> None:
    mpp = build("mpp", model={"in_chans": 3, "img_size": 8}, pixel_mean=[0.5] * 3, pixel_std=[0.5] * 3)
    assert isinstance(mpp, MPP) and mpp.classes == 512
    img = torch.zeros(3, 8, 8)
    img[:, :4, :4] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)  # pure red -> (7, 0, 0) = 448
    img[:, :4, 4:] = torch.tensor([0.3, 0.55, 0.999]).view(3, 1, 1)  # (2, 4, 7) = 167
    img[:, 4:, :4] = torch.tensor([0.125, 0.124, 0.5]).view(3, 1, 1)  # (1, 0, 4) = 68
    img[:, 4:, 4:] = torch.rand(3, 4, 4)  # a textured patch: its mean matters
    classes = mpp.colour_classes(((img - 0.5) / 0.5).unsqueeze(0))[0]  # (N, 1)
    assert classes[:3, 0].tolist() == [448, 167, 68]
    assert torch.equal(classes, _loop_classes(img, 4, 1, 3))


def test_mpp_grey_and_downsized_targets() -> None:
    grey = build("mpp")
    assert isinstance(grey, MPP) and grey.classes == 8
    img = torch.rand(1, 16, 16)
    assert torch.equal(grey.colour_classes(img.unsqueeze(0) * 2 - 1)[0], _loop_classes(img, 4, 1, 3))
    down = build(
        "mpp", model={"in_chans": 3, "img_size": 16, "patch_size": 8}, target="downsized", downsize=4
    )
    assert isinstance(down, MPP)
    rgb = torch.rand(3, 16, 16)
    assert torch.equal(down.colour_classes(rgb.unsqueeze(0) * 2 - 1)[0], _loop_classes(rgb, 8, 4, 3))


def test_mpp_reconstruct_is_seeded_and_paints_bin_centres() -> None:
    mpp = build("mpp")
    assert isinstance(mpp, MPP)
    imgs = torch.rand(2, 1, 16, 16) * 2 - 1
    first = mpp.reconstruct(imgs, torch.Generator().manual_seed(3))
    again = mpp.reconstruct(imgs, torch.Generator().manual_seed(3))
    assert torch.equal(first["mask"], again["mask"]) and torch.equal(first["pred"], again["pred"])
    assert first["mask"].shape == (2, 16) and first["pred"].shape == imgs.shape
    patches = first["pred"].unfold(2, 4, 4).unfold(3, 4, 4).reshape(2, 16, 16)  # (B, N, 16 px), row-major
    inputs = imgs.unfold(2, 4, 4).unfold(3, 4, 4).reshape(2, 16, 16)
    centres = {((lv + 0.5) / 8 - 0.5) / 0.5 for lv in range(8)}
    for b in range(2):
        for n in range(16):
            if first["mask"][b, n]:  # a flat patch at a bin centre
                value = patches[b, n, 0].item()
                assert (patches[b, n] == value).all() and min(abs(value - c) for c in centres) < 1e-6
            else:
                assert torch.equal(patches[b, n], inputs[b, n])


# ------------------------------------------------------------------ MAE
@pytest.mark.parametrize("n, ratio", [(16, 0.75), (196, 0.75), (10, 0.33), (7, 0.5)])
def test_random_masking_keeps_floor_and_restores(n: int, ratio: float) -> None:
    keep_idx, mask, restore_idx = random_masking(5, n, ratio, torch.device("cpu"))
    kept = math.floor(n * (1 - ratio))
    assert keep_idx.shape == (5, kept) and (mask.sum(1) == n - kept).all()
    for b in range(5):
        assert sorted(restore_idx[b].tolist()) == list(range(n))
        assert set(keep_idx[b].tolist()) == {i for i in range(n) if not mask[b, i]}
    # restore_idx inverts the shuffle whose first `kept` entries are the kept patches
    shuffle = torch.argsort(restore_idx, dim=1)
    assert torch.equal(shuffle[:, :kept], keep_idx)
    assert torch.equal(torch.gather(shuffle, 1, restore_idx), torch.arange(n).expand(5, n))


def _loop_mae_loss(
    imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch: int, norm: bool
) -> float:
    batch, chans, size, _ = imgs.shape
    total, count = 0.0, 0
    for b in range(batch):
        n = 0
        for py in range(size // patch):
            for px in range(size // patch):
                if mask[b, n]:
                    values = [
                        float(imgs[b, c, py * patch + y, px * patch + x])
                        for y in range(patch)
                        for x in range(patch)
                        for c in range(chans)
                    ]
                    if norm:
                        mean = sum(values) / len(values)
                        var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
                        values = [(v - mean) / math.sqrt(var + 1e-6) for v in values]
                    total += sum((float(p) - v) ** 2 for p, v in zip(pred[b, n], values, strict=True)) / len(
                        values
                    )
                    count += 1
                n += 1
    return total / count


@pytest.mark.parametrize("norm", [True, False])
def test_mae_loss_formula_and_masked_patches_only(norm: bool) -> None:
    mae = build("mae", model={"in_chans": 3}, norm_pix_loss=norm)
    assert isinstance(mae, MAE)
    imgs = torch.randn(3, 3, 16, 16)
    pred = torch.randn(3, 16, 48)
    _, mask, _ = random_masking(3, 16, 0.75, torch.device("cpu"))
    loss = mae.patch_loss(imgs, pred, mask)
    assert loss.item() == pytest.approx(_loop_mae_loss(imgs, pred, mask, 4, norm), rel=1e-5)
    edited = pred.clone()
    edited[~mask] += 100.0  # visible patches do not count
    assert mae.patch_loss(imgs, edited, mask).item() == pytest.approx(loss.item(), rel=1e-6)
    edited[mask] += 1.0
    assert mae.patch_loss(imgs, edited, mask).item() > loss.item()


def test_mae_encoder_sees_only_the_kept_tokens_and_loss_is_float32() -> None:
    mae = build("mae")
    assert isinstance(mae, MAE)
    lengths: list[int] = []
    hook = mae.backbone.vit.blocks[0].register_forward_hook(lambda m, i, o: lengths.append(o.shape[1]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = mae(Batch(views=[torch.randn(4, 1, 16, 16)], labels=torch.zeros(4, dtype=torch.long)))
    hook.remove()
    assert lengths == [1 + 4]  # CLS + floor(16 * 0.25)
    assert loss.dtype == torch.float32


def test_mae_reconstruct_is_seeded_and_unnormalises() -> None:
    mae = build("mae")
    assert isinstance(mae, MAE)
    imgs = torch.randn(2, 1, 16, 16)
    first = mae.reconstruct(imgs, torch.Generator().manual_seed(1))
    again = mae.reconstruct(imgs, torch.Generator().manual_seed(1))
    assert torch.equal(first["mask"], again["mask"]) and torch.allclose(first["pred"], again["pred"])
    assert first["pred"].shape == imgs.shape and first["mask"].sum() == 2 * 12
    # pred un-normalised with each true patch's statistics: normalising it back gives the raw output
    pred, _ = mae.predict(imgs, torch.Generator().manual_seed(1))
    true = imgs.unfold(2, 4, 4).unfold(3, 4, 4).reshape(2, 16, 16)
    got = first["pred"].unfold(2, 4, 4).unfold(3, 4, 4).reshape(2, 16, 16)
    back = (got - true.mean(-1, keepdim=True)) / (true.var(-1, keepdim=True) + 1e-6).sqrt()
    assert torch.allclose(back, pred, atol=1e-4)


# ------------------------------------------------------------------ contrastive
def test_nt_xent_equals_loop_over_pairs() -> None:
    torch.manual_seed(0)
    z1, z2, tau = torch.randn(5, 8), torch.randn(5, 8), 0.3
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n2 = z.shape[0]
    total = 0.0
    for i in range(n2):
        positive = (i + 5) % n2
        denominator = sum(math.exp(float(z[i] @ z[k]) / tau) for k in range(n2) if k != i)
        total += -math.log(math.exp(float(z[i] @ z[positive]) / tau) / denominator)
    assert nt_xent(z1, z2, tau).item() == pytest.approx(total / n2, rel=1e-5)


def test_moco_loss_equals_loop_over_pairs() -> None:
    torch.manual_seed(0)
    q, k, tau = torch.randn(6, 8), torch.randn(6, 8), 0.2
    qn, kn = F.normalize(q, dim=1), F.normalize(k, dim=1)
    total = 0.0
    for i in range(6):
        denominator = sum(math.exp(float(qn[i] @ kn[j]) / tau) for j in range(6))
        total += -math.log(math.exp(float(qn[i] @ kn[i]) / tau) / denominator)
    assert moco_loss(q, k, tau).item() == pytest.approx(2 * tau * total / 6, rel=1e-5)


def test_momentum_branches_cover_the_whole_teacher() -> None:
    for name, teacher_names in [("mocov3", ("momentum_",)), ("dino", ("teacher_",))]:
        obj = build(name)
        pairs = obj.ema_pairs()
        covered = {id(p) for _, t in pairs for p in t.parameters()}
        owned = {id(p) for n, p in obj.named_parameters() if n.startswith(teacher_names)}
        assert covered == owned and owned
        assert all(not p.requires_grad for _, t in pairs for p in t.parameters())
        assert {type(o) for o, _ in pairs} == {type(t) for _, t in pairs}
        assert any(o is obj.backbone for o, _ in pairs)  # the backbone and its head/projector
    assert obj.ema_momentum(0, 100) == pytest.approx(0.996) and obj.ema_momentum(100, 100) == 1.0
    assert obj.ema_momentum(50, 100) == pytest.approx(1 - 0.004 * 0.5)


def test_mocov3_frozen_patch_projection() -> None:
    moco = build("mocov3", freeze_patch_proj=True)
    proj = moco.backbone.vit.patch_embed.proj
    assert not proj.weight.requires_grad
    bound = math.sqrt(6.0 / (16 + 32))
    assert proj.weight.abs().max() <= bound and proj.weight.abs().max() > 0.8 * bound


# ------------------------------------------------------------------ DINO
def test_dino_loss_equals_sum_over_view_pairs() -> None:
    torch.manual_seed(0)
    student = [torch.randn(4, 10) for _ in range(5)]
    teacher = [torch.randn(4, 10) for _ in range(2)]
    center, tt, ts = torch.randn(1, 10) * 0.1, 0.05, 0.1
    total, terms = 0.0, 0
    for iq in range(2):
        for v in range(5):
            if v == iq:
                continue
            for b in range(4):
                t = [math.exp((float(teacher[iq][b, k]) - float(center[0, k])) / tt) for k in range(10)]
                s = [math.exp(float(student[v][b, k]) / ts) for k in range(10)]
                total += -sum(t[k] / sum(t) * math.log(s[k] / sum(s)) for k in range(10)) / 4
            terms += 1
    assert terms == 2 * 5 - 2
    assert dino_loss(student, teacher, center, tt, ts).item() == pytest.approx(total / terms, rel=1e-5)


def test_dino_center_update_and_teacher_temperature_schedule() -> None:
    dino = build(
        "dino", warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=3.0, local_crops=2
    )
    assert isinstance(dino, DINO)
    assert dino.views().local_size == 8 and dino.views().local_views == 2
    # The official schedule: np.linspace(0.04, 0.07, 3) indexed by the whole epoch, then 0.07.
    official = [0.04, 0.055, 0.07]
    for step in range(0, 100, 5):
        dino.set_progress(step, 100, 10)
        epoch = step // 10
        assert dino.teacher_temp == pytest.approx(official[epoch] if epoch < 3 else 0.07)
    per_step = build(
        "dino",
        warmup_teacher_temp=0.04,
        teacher_temp=0.07,
        warmup_teacher_temp_epochs=3.0,
        warmup_teacher_temp_per="step",
    )
    assert isinstance(per_step, DINO)
    for step, expected in [(0, 0.04), (10, 0.05), (15, 0.055), (20, 0.06), (30, 0.07), (95, 0.07)]:
        per_step.set_progress(step, 100, 10)
        assert per_step.teacher_temp == pytest.approx(expected)
    batch = Batch(
        views=[
            torch.randn(4, 1, 16, 16),
            torch.randn(4, 1, 16, 16),
            torch.randn(4, 1, 8, 8),
            torch.randn(4, 1, 8, 8),
        ],
        labels=torch.zeros(4, dtype=torch.long),
    )
    before = dino.center.clone()
    dino(batch)
    assert torch.equal(dino.center, before)  # forward does not touch the centre
    with torch.no_grad():
        teacher = dino.teacher_head(dino.teacher_backbone(torch.cat(batch.views[:2])))  # (8, K)
    dino.after_optimizer_step()
    expected = 0.9 * before + 0.1 * teacher.mean(0, keepdim=True)
    assert torch.allclose(dino.center, expected, atol=1e-6)


def test_a_skipped_step_never_reaches_the_dino_centre() -> None:
    """The engine calls after_skipped_step for a non-finite step: its teacher outputs are dropped, so
    the next centre update averages the next step's outputs only."""
    from ssl_vit.engine.ema import Teacher

    dino = build("dino", local_crops=0)
    assert isinstance(dino, DINO)
    skipped = Batch(views=[torch.full((4, 1, 16, 16), float("nan"))] * 2, labels=torch.zeros(4))
    kept = Batch(views=[torch.randn(4, 1, 16, 16), torch.randn(4, 1, 16, 16)], labels=torch.zeros(4))
    teacher, before = Teacher(dino), dino.center.clone()
    dino(skipped)
    teacher_after_skip = [p.clone() for p in dino.teacher_backbone.parameters()]
    assert math.isnan(teacher.update(False, 0, 10))  # skipped: no EMA, no centre update
    assert torch.equal(dino.center, before)
    assert all(
        torch.equal(a, b) for a, b in zip(teacher_after_skip, dino.teacher_backbone.parameters(), strict=True)
    )
    dino(kept)
    with torch.no_grad():
        outputs = dino.teacher_head(dino.teacher_backbone(torch.cat(kept.views)))  # (8, K)
    dino.after_optimizer_step()  # what teacher.update(True, ...) ends with
    assert torch.isfinite(dino.center).all()
    torch.testing.assert_close(dino.center, 0.9 * before + 0.1 * outputs.mean(0, keepdim=True))


def test_dino_local_crops_run_at_their_own_resolution() -> None:
    dino = build("dino", local_crops=3)
    lengths: list[int] = []
    hook = dino.backbone.vit.blocks[0].register_forward_hook(lambda m, i, o: lengths.append(o.shape[1]))
    batch = Batch(
        views=[torch.randn(2, 1, 16, 16)] * 2 + [torch.randn(2, 1, 8, 8)] * 3, labels=torch.zeros(2)
    )
    dino(batch)
    hook.remove()
    assert lengths == [1 + 16, 1 + 4]  # globals together, locals together at 2x2 patches


def test_dino_last_layer_frozen_during_first_epoch() -> None:
    dino = build("dino", local_crops=0, freeze_last_layer_epochs=1.0)
    batch = Batch(views=[torch.randn(4, 1, 16, 16)] * 2, labels=torch.zeros(4))
    for step, frozen in [(5, True), (10, False)]:
        dino.zero_grad()
        dino.set_progress(step, 100, 10)
        dino(batch)[0].backward()
        dino.after_backward()
        assert (dino.head.last_layer.v.grad is None) == frozen
        assert dino.head.mlp[0].weight.grad is not None


def test_dino_student_fits_a_fixed_teacher() -> None:
    """With the teacher and centre held still, the loss is H(P_t) + KL(P_t || P_s): the KL must shrink."""
    torch.manual_seed(0)
    dino = build("dino", local_crops=0, freeze_last_layer_epochs=0.0)
    dino.set_progress(10, 100, 10)
    batch = Batch(views=[torch.randn(8, 1, 16, 16), torch.randn(8, 1, 16, 16)], labels=torch.zeros(8))
    opt = torch.optim.AdamW([p for p in dino.parameters() if p.requires_grad], lr=1e-3)
    with torch.no_grad():
        dino.train()
        teacher = dino.teacher_head(dino.teacher_backbone(torch.cat(batch.views))).chunk(2)
        probs = [F.softmax((t - dino.center) / dino.teacher_temp, dim=-1) for t in teacher]
        entropy = sum(-(p * p.log()).sum(-1).mean() for p in probs) / 2  # both pairs are (t_i, s_j), i != j
    kl = []
    for _ in range(30):
        loss, _ = dino(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        kl.append(loss.item() - float(entropy))
    assert kl[0] > 0.05 and kl[-1] < 0.5 * kl[0], kl


def test_dino_weight_normalised_last_layer() -> None:
    from ssl_vit.objectives.dino import WeightNormLinear

    layer = WeightNormLinear(6, 5, fix_norm=False)
    with torch.no_grad():
        layer.g.copy_(torch.rand(5, 1) + 0.5)
    x = torch.randn(3, 6)
    weight = torch.stack([layer.g[k, 0] * layer.v[k] / layer.v[k].norm() for k in range(5)])
    assert torch.allclose(layer(x), x @ weight.T, atol=1e-6)
    fixed = WeightNormLinear(6, 5, fix_norm=True)
    assert [n for n, _ in fixed.named_parameters()] == ["v"] and torch.equal(fixed.g, torch.ones(5, 1))
