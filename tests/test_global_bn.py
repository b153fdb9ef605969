"""Global BatchNorm in the objectives' heads: 2 processes equal one process holding the whole batch.

Each process holds half the images of two views. The heads' outputs, the gradients of their inputs
and (summed over processes) of their parameters, and the running statistics of the online and the
EMA heads must be those of one process on the concatenated batch. With `global_bn: false` each
process normalises its own half instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from einops import rearrange
from torch import Tensor, nn

from ssl_vit import objectives
from ssl_vit.backbone import Backbone
from ssl_vit.objectives import Objective
from ssl_vit.objectives._shared import GlobalBatchNorm1d
from tests.conftest import run_processes, tiny_model_config

BATCH, WIDTH, OUT = 8, 32, 16
HEADS: dict[str, dict[str, Any]] = {  # small heads, each with BatchNorm
    "simclr": dict(proj_hidden_dim=24, proj_dim=OUT),
    "mocov3": dict(mlp_dim=24, dim=OUT),
    "dino": dict(hidden_dim=24, bottleneck_dim=8, out_dim=OUT, head_bn=True),
}
Result = dict[str, Any]


def _views() -> Tensor:
    """Features of 2 views: (2, BATCH, WIDTH). The second half of the images is shifted, so that
    each process's statistics differ from the global ones."""
    views = torch.randn(2, BATCH, WIDTH, generator=torch.Generator().manual_seed(1))
    views[:, BATCH // 2 :] += 1.0
    return views


def _build(name: str, global_bn: bool) -> Objective:
    torch.manual_seed(0)
    options = {"name": name, **HEADS[name], "global_bn": global_bn}
    return objectives.build(options, Backbone.from_config(tiny_model_config())).train()


def _apply_heads(obj: Any, name: str, views: Tensor) -> Tensor:
    """The heads on `views` (2, b, WIDTH) as the objective's `forward` applies them: (2, b, OUT)."""
    flat = rearrange(views, "v b d -> (v b) d")  # SimCLR, DINO: one BatchNorm batch over both views
    with torch.no_grad():  # the EMA branch's heads: running statistics only
        if name == "mocov3":
            [obj.momentum_projector(v) for v in views]
        elif name == "dino":
            obj.teacher_head(flat)
    if name == "simclr":
        out = obj.projector(flat)
    elif name == "mocov3":  # each view is its own BatchNorm batch
        out = torch.cat([obj.predictor(obj.projector(v)) for v in views])
    else:
        out = obj.head(flat)
    return rearrange(out, "(v b) k -> v b k", v=2)


def _result(name: str, global_bn: bool, part: slice, device: str = "cpu") -> Result:
    """Outputs and gradients for the images `part`. The loss is a fixed weighting of the outputs, so
    the processes' losses sum to the whole batch's loss, and their parameter gradients to its."""
    obj = _build(name, global_bn).to(device)
    views = _views()[:, part].to(device).requires_grad_()
    out = _apply_heads(obj, name, views)
    weight = torch.randn(2, BATCH, OUT, generator=torch.Generator().manual_seed(2))[:, part]
    (out * weight.to(device)).sum().backward()
    return {
        "global": any(isinstance(m, GlobalBatchNorm1d) for m in obj.modules()),
        "out": out.detach().cpu(),
        "input_grad": views.grad.cpu(),  # type: ignore[union-attr]
        "grads": {n: p.grad.cpu() for n, p in obj.named_parameters() if p.grad is not None},
        "stats": {n: b.cpu() for n, b in obj.named_buffers() if n.endswith(("running_mean", "running_var"))},
    }


def _worker(rank: int, world: int, out_dir: str, device: str) -> None:
    part = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    results: dict[Any, Any] = {}
    for name in HEADS:
        for global_bn in (True, False):
            res = results[name, global_bn] = _result(name, global_bn, part, device)
            for grad in res["grads"].values():
                dist.all_reduce(grad)  # summed, as the losses are
    norm = GlobalBatchNorm1d(WIDTH).to(device)  # bf16 input, as under autocast
    out = norm(_views()[0, part].to(device, torch.bfloat16))
    results["bf16"] = {"out": out.cpu(), "mean": norm.running_mean, "var": norm.running_var}
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


@pytest.fixture(
    scope="module",
    params=[
        "cpu",
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices"),
            ],
        ),
    ],
)
def two_processes(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> list[Any]:
    """Every head, global_bn on and off, on 2 processes: gloo on CPU, NCCL (SyncBatchNorm) on CUDA."""
    tmp = tmp_path_factory.mktemp(f"global_bn_{request.param}")
    backend = "nccl" if request.param == "cuda" else "gloo"
    run_processes(_worker, 2, tmp, str(tmp), request.param, backend=backend)
    return [torch.load(tmp / f"rank{r}.pt", map_location="cpu") for r in range(2)]


def _close(a: Tensor, b: Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(HEADS))
def test_two_processes_equal_one_process_on_the_whole_batch(name: str, two_processes: list[Any]) -> None:
    ranks = [r[name, True] for r in two_processes]
    whole = _result(name, True, slice(None))  # one process holding all BATCH images
    assert _close(torch.cat([r["out"] for r in ranks], dim=1), whole["out"])
    assert _close(torch.cat([r["input_grad"] for r in ranks], dim=1), whole["input_grad"])
    for r in ranks:
        assert r["grads"].keys() == whole["grads"].keys() and r["stats"].keys() == whole["stats"].keys()
        assert all(_close(r["grads"][n], g) for n, g in whole["grads"].items())
        assert all(_close(r["stats"][n], s) for n, s in whole["stats"].items())


@pytest.mark.parametrize("name", list(HEADS))
def test_global_bn_off_normalises_each_process_alone(name: str, two_processes: list[Any]) -> None:
    whole = _result(name, False, slice(None))
    for rank, r in enumerate(two_processes):
        alone = _result(name, False, slice(rank * BATCH // 2, (rank + 1) * BATCH // 2))  # one half, alone
        assert not r[name, False]["global"]
        assert _close(r[name, False]["out"], alone["out"])
        assert all(_close(r[name, False]["stats"][n], s) for n, s in alone["stats"].items())
        # in every head, the EMA heads included, statistics differ from the whole batch's
        differ = {
            n.split(".")[0] for n, s in whole["stats"].items() if not _close(r[name, False]["stats"][n], s)
        }
        assert differ == {n.split(".")[0] for n in whole["stats"]}
    assert not _close(torch.cat([r[name, False]["out"] for r in two_processes], dim=1), whole["out"])


def test_bf16_input_gets_float32_statistics(two_processes: list[Any]) -> None:
    x = _views()[0].bfloat16()
    reference = nn.BatchNorm1d(WIDTH)
    expected = reference(x.float())  # float32 statistics of the same bf16 values
    got = [r["bf16"] for r in two_processes]
    assert all(g["out"].dtype == torch.bfloat16 for g in got)
    assert torch.allclose(torch.cat([g["out"] for g in got]).float(), expected, atol=2e-2)
    for g in got:  # statistics accumulated in bf16 would be off by ~1e-3
        assert torch.allclose(g["mean"], reference.running_mean, atol=1e-6)  # type: ignore[arg-type]
        assert torch.allclose(g["var"], reference.running_var, atol=1e-6)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", list(HEADS))
def test_one_process_is_plain_batchnorm_exactly(name: str) -> None:
    on, off = _result(name, True, slice(None)), _result(name, False, slice(None))
    assert on["global"] and not off["global"]
    assert torch.equal(on["out"], off["out"]) and torch.equal(on["input_grad"], off["input_grad"])
    assert on["grads"].keys() == off["grads"].keys() and on["stats"].keys() == off["stats"].keys()
    assert all(torch.equal(on["grads"][n], g) for n, g in off["grads"].items())
    assert all(torch.equal(on["stats"][n], s) for n, s in off["stats"].items())
