from __future__ import annotations

import math

import pytest
import torch

from ssl_vit.backbone import Backbone
from ssl_vit.errors import CheckpointError, RecipeError
from ssl_vit.objectives import build
from ssl_vit.optim import param_groups
from tests.conftest import tiny_model_config


def test_shapes(tiny_backbone: Backbone) -> None:
    imgs = torch.randn(3, 1, 16, 16)
    tokens = tiny_backbone.embed(imgs)
    assert tokens.shape == (3, 16, 32)
    out = tiny_backbone.encode(tokens)
    assert out.shape == (3, 1 + 16, 32)
    assert tiny_backbone(imgs).shape == (3, 32)
    assert tiny_backbone.patch_tokens(out).shape == (3, 16, 32)


def test_encode_embed_equals_timm_forward_features(tiny_backbone: Backbone) -> None:
    tiny_backbone.eval()
    imgs = torch.randn(2, 1, 16, 16)
    ours = tiny_backbone.encode(tiny_backbone.embed(imgs))
    assert torch.equal(ours, tiny_backbone.vit.forward_features(imgs))


def test_dropping_tokens_equals_running_on_the_kept_subset(tiny_backbone: Backbone) -> None:
    """keep_idx must select tokens *and* their position embeddings, then run the blocks on them only."""
    tiny_backbone.eval()
    imgs = torch.randn(2, 1, 16, 16)
    tokens = tiny_backbone.embed(imgs)
    keep_idx = torch.stack([torch.randperm(16)[:4] for _ in range(2)])  # (B, 4)
    out = tiny_backbone.encode(tokens, keep_idx=keep_idx)
    assert out.shape == (2, 1 + 4, 32)
    # Independent path: add positions to the full set, take the subset, run timm's blocks by hand.
    vit = tiny_backbone.vit
    with_pos = tokens + vit.pos_embed[:, 1:]
    subset = torch.stack([with_pos[b, keep_idx[b]] for b in range(2)])
    cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(2, -1, -1)
    expected = vit.norm(vit.blocks(torch.cat([cls, subset], dim=1)))
    torch.testing.assert_close(out, expected)


def test_mask_token_replacement_changes_only_masked_inputs(tiny_backbone: Backbone) -> None:
    tokens = tiny_backbone.embed(torch.randn(2, 1, 16, 16))
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, 3] = mask[1, 7] = True
    mask_token = torch.full((32,), 5.0)
    replaced = Backbone.replace_tokens(tokens, mask, mask_token)
    assert torch.equal(replaced[~mask], tokens[~mask])
    assert torch.equal(replaced[mask], mask_token.expand(2, 32))
    assert not torch.equal(tiny_backbone.encode(replaced), tiny_backbone.encode(tokens))


def test_other_grid_sizes_resample_position_embeddings(tiny_backbone: Backbone) -> None:
    """DINO's local crops: a smaller image goes through with interpolated position embeddings."""
    out = tiny_backbone.forward_features(torch.randn(2, 1, 8, 8))
    assert out.shape == (2, 1 + 4, 32)


def test_fixed_sincos_position_embeddings_are_frozen() -> None:
    backbone = Backbone.from_config(tiny_model_config(pos_embed="sincos"))
    pos = backbone.vit.pos_embed
    assert not pos.requires_grad
    assert torch.all(pos[:, 0] == 0) and pos[:, 1:].abs().sum() > 0


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("vit_tiny_patch16_224", dict(img_size=32, patch_size=16, in_chans=3)),
        ("vit_small_patch16_224", dict(img_size=32, patch_size=8, in_chans=3)),
        ("vit_base_patch16_224", dict(img_size=28, patch_size=14, in_chans=4)),
        ("vit_large_patch16_224", dict(img_size=16, patch_size=4, in_chans=1)),
    ],
)
def test_timm_variants_by_name(name: str, overrides: dict[str, int]) -> None:
    """Named variants keep their width; depth is cut to 1 only to keep the test cheap."""
    cfg = tiny_model_config(name=name, embed_dim=None, num_heads=None, depth=1, **overrides)
    backbone = Backbone.from_config(cfg)
    grid = overrides["img_size"] // overrides["patch_size"]
    out = backbone.forward_features(
        torch.randn(1, overrides["in_chans"], overrides["img_size"], overrides["img_size"])
    )
    assert out.shape[1] == 1 + grid * grid
    assert (
        out.shape[2]
        == {"vit_tiny": 192, "vit_small": 384, "vit_base": 768, "vit_large": 1024}[name.rsplit("_", 2)[0]]
    )


def test_unknown_model_name_is_a_recipe_error() -> None:
    with pytest.raises(RecipeError, match="not a timm model"):
        Backbone.from_config(tiny_model_config(name="vit_tinyy"))


def test_freeze_patch_embed_keeps_or_redraws_the_projection(tiny_backbone: Backbone) -> None:
    before = {n: p.detach().clone() for n, p in tiny_backbone.named_parameters()}
    tiny_backbone.freeze_patch_embed()
    tiny_backbone(torch.randn(2, 1, 16, 16)).sum().backward()
    frozen = {n for n, p in tiny_backbone.named_parameters() if not p.requires_grad}
    assert frozen == {"vit.patch_embed.proj.weight", "vit.patch_embed.proj.bias"}
    assert all(p.grad is None for n, p in tiny_backbone.named_parameters() if n in frozen)
    assert all(torch.equal(p, before[n]) for n, p in tiny_backbone.named_parameters())
    tiny_backbone.freeze_patch_embed(reinit=True)  # MoCo v3: xavier-uniform, fan-in 1*4*4, width 32
    weight = tiny_backbone.vit.patch_embed.proj.weight
    assert not torch.equal(weight, before["vit.patch_embed.proj.weight"])
    assert weight.abs().max() <= (6 / (16 + 32)) ** 0.5 and not weight.requires_grad


def _uniform_with_bound(weight: torch.Tensor, bound: float) -> bool:
    """Drawn from U(-bound, bound): inside it, reaching near it, with std bound / sqrt(3)."""
    w = weight.detach().flatten()
    return bool(w.abs().max() <= bound and w.abs().max() > 0.9 * bound) and abs(
        float(w.std()) - bound / math.sqrt(3)
    ) < 0.1 * bound / math.sqrt(3)


@pytest.mark.parametrize("scheme", ["mae", "mocov3"])
def test_official_initialisations_follow_their_formulas(scheme: str) -> None:
    # Width D=64, 4 heads, patch 4 on 1 channel: qkv is (3D, D), fc1 (4D, D), the patch projection
    # (D, 1*4*4). MAE: xavier over the whole qkv, bound sqrt(6 / (3D + D)); MoCo v3: over each of q,
    # k and v, bound sqrt(6 / (D + D)). Patch projection: xavier over its flattened fan-in.
    dim = 64
    backbone = Backbone.from_config(tiny_model_config(embed_dim=dim, num_heads=4, init=scheme))
    block = backbone.vit.blocks[0]
    qkv_bound = math.sqrt(6 / (dim + dim)) if scheme == "mocov3" else math.sqrt(6 / (4 * dim))
    assert _uniform_with_bound(block.attn.qkv.weight, qkv_bound)
    assert _uniform_with_bound(block.mlp.fc1.weight, math.sqrt(6 / (dim + 4 * dim)))
    assert _uniform_with_bound(block.attn.proj.weight, math.sqrt(6 / (dim + dim)))
    assert not block.attn.qkv.bias.any() and not block.mlp.fc2.bias.any()
    proj = backbone.vit.patch_embed.proj
    assert _uniform_with_bound(proj.weight, math.sqrt(6 / (16 + dim)))
    assert (not proj.bias.any()) == (scheme == "mocov3")  # MAE leaves PyTorch's conv bias
    cls_std = float(backbone.vit.cls_token.detach().std())
    assert 0.01 < cls_std < 0.03 if scheme == "mae" else cls_std < 1e-5
    timm_qkv = Backbone.from_config(tiny_model_config(embed_dim=dim, num_heads=4)).vit.blocks[0].attn.qkv
    assert float(timm_qkv.weight.detach().std()) < 0.03  # timm's trunc-normal(0.02): a different draw
    backbone.reset_parameters(seed=1)  # the random-init baseline keeps the scheme
    assert _uniform_with_bound(backbone.vit.blocks[0].attn.qkv.weight, qkv_bound)
    with pytest.raises(RecipeError, match="model.init"):
        Backbone.from_config(tiny_model_config(init="jax"))


def test_layer_id_puts_embeddings_first_then_the_blocks_and_heads_on_top() -> None:
    """Expected layers come from module membership, not names; the lr scales of `param_groups` follow."""
    torch.manual_seed(0)
    backbone = Backbone.from_config(tiny_model_config(depth=3))
    objective = build({"name": "supervised"}, backbone, num_classes=10)
    vit = backbone.vit
    expected = {id(vit.cls_token): 0, id(vit.pos_embed): 0}
    expected |= {id(p): 0 for p in vit.patch_embed.parameters()}
    expected |= {id(p): i + 1 for i, block in enumerate(vit.blocks) for p in block.parameters()}
    expected |= {id(p): 4 for p in vit.norm.parameters()}
    expected |= {id(p): 4 for p in objective.head.parameters()}
    assert backbone.num_layers == objective.num_layers == 4
    named = dict(objective.named_parameters())
    assert {id(p) for p in named.values()} == set(expected)
    assert all(objective.layer_id(n) == expected[id(p)] for n, p in named.items())
    assert all(backbone.layer_id(n) == expected[id(p)] for n, p in backbone.named_parameters())
    for group in param_groups(objective, 0.05, layer_decay=0.5):
        for name in group["param_names"]:  # type: ignore[attr-defined]
            assert group["lr_scale"] == 0.5 ** (4 - expected[id(named[name])]), name


def test_loading_weights_at_another_image_size_resamples_the_position_embedding(
    tiny_backbone: Backbone,
) -> None:
    source = tiny_backbone.vit.state_dict()  # 16 px, 4x4 grid
    bigger = Backbone.from_config(tiny_model_config(img_size=24))  # 6x6 grid
    done = bigger.load_timm_weights(source)
    pos = bigger.vit.pos_embed
    assert pos.shape == (1, 1 + 36, 32) and done.missing == [] and len(done.loaded) == len(source)
    assert torch.equal(pos[:, :1], source["pos_embed"][:, :1])  # the CLS position is kept as is
    assert done.adapted == ["pos_embed resampled from a 4x4 to a 6x6 grid (bicubic)"]
    loaded = bigger.vit.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in source.items() if k != "pos_embed")
    assert bigger(torch.randn(2, 1, 24, 24)).shape == (2, 32)


def test_loading_weights_of_another_architecture_is_one_line_naming_the_key(tiny_backbone: Backbone) -> None:
    wider_mlp = Backbone.from_config(tiny_model_config(mlp_ratio=2.0))
    with pytest.raises(CheckpointError, match="'blocks.0.mlp.fc1.weight' has shape") as err:
        wider_mlp.load_timm_weights(tiny_backbone.vit.state_dict())
    assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="'head.weight' is not a weight of this backbone"):
        wider_mlp.load_timm_weights({"head.weight": torch.zeros(3, 32)})
