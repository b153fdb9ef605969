"""Negatives gathered across processes: 2 gloo processes on CPU give the single-process loss and gradient.

Each process holds half the batch. Averaging the per-process losses and gradients (what DDP does)
must give exactly the loss and gradient of one process holding the whole batch; with negatives
that were not gathered, or gathered without gradient, it does not.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ssl_vit.objectives._shared import all_reduce_mean, gather_with_grad
from ssl_vit.objectives.mocov3 import moco_loss
from ssl_vit.objectives.simclr import nt_xent
from tests.conftest import run_processes

BATCH, DIM, TAU = 8, 12, 0.2


def _problem() -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Linear(DIM, 6), torch.randn(BATCH, DIM), torch.randn(BATCH, DIM)


def _losses(part: slice) -> dict[str, torch.Tensor]:
    """SimCLR and MoCo v3 losses on rows `part` of the batch, with gradients of the shared layer."""
    out: dict[str, torch.Tensor] = {}
    for name in ("simclr", "moco"):
        layer, x1, x2 = _problem()
        z1, z2 = layer(x1[part]), layer(x2[part])
        if name == "simclr":
            loss = nt_xent(z1, z2, TAU)
        else:  # keys come from a no-grad branch in MoCo v3
            loss = moco_loss(z1, z2.detach(), TAU) + moco_loss(z2, z1.detach(), TAU)
        loss.backward()
        out[f"{name}_loss"] = loss.detach()
        out[f"{name}_grad"] = torch.cat([layer.weight.grad.flatten(), layer.bias.grad])  # type: ignore[union-attr]
    return out


def _worker(rank: int, world: int, out_dir: str) -> None:
    per = BATCH // world
    out = _losses(slice(rank * per, (rank + 1) * per))
    for key in [k for k in out if k.endswith("grad")]:
        dist.all_reduce(out[key])
        out[key] /= world  # DDP's gradient average
    out["gathered"] = gather_with_grad(torch.full((2, 3), float(rank)))
    out["center"] = all_reduce_mean(torch.full((1, 4), float(rank)))
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")


def test_two_process_loss_and_gradient_equal_single_process(tmp_path: Path) -> None:
    run_processes(_worker, 2, tmp_path, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    single = _losses(slice(0, BATCH))
    for name in ("simclr", "moco"):
        mean_loss = (ranks[0][f"{name}_loss"] + ranks[1][f"{name}_loss"]) / 2
        assert torch.allclose(mean_loss, single[f"{name}_loss"], atol=1e-6), name
        for r in ranks:
            assert torch.allclose(r[f"{name}_grad"], single[f"{name}_grad"], atol=1e-6), name
    # a local-only loss (what forgetting the gather gives) differs
    local = _losses(slice(0, BATCH // 2))["simclr_loss"]
    assert not torch.allclose(local, single["simclr_loss"])
    expected = torch.cat([torch.zeros(2, 3), torch.ones(2, 3)])
    assert all(torch.equal(r["gathered"], expected) for r in ranks)
    assert all(torch.allclose(r["center"], torch.full((1, 4), 0.5)) for r in ranks)
