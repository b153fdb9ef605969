"""Shards: writing, streaming across ranks and workers, reproducibility, and safety against bad data."""

from __future__ import annotations

import io
import json
import pickle
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from ssl_vit.cli import main
from ssl_vit.config import DataConfig
from ssl_vit.data import class_names, load_images, reset_skip_counts, skip_counts, train_loader
from ssl_vit.data.builtin import parse_builtin
from ssl_vit.data.digits import digits_split
from ssl_vit.data.loader import build_loader
from ssl_vit.data.shards import write_shards
from ssl_vit.data.sources import builtin_shards, resolve
from ssl_vit.errors import DataError
from ssl_vit.types import Batch, ViewSpec
from tests.conftest import TINY


def png(value: int, size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size), value % 256, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_tar(path: Path, labels: list[int], extra: dict[int, dict[str, bytes]] | None = None) -> None:
    """A shard written by plain webdataset: `__key__`, `.png`, `.cls` (what the README documents)."""
    with wds.TarWriter(str(path)) as sink:
        for label in labels:
            more = (extra or {}).get(label, {})
            sample = {"__key__": f"s{label:06d}", "cls": str(label).encode()}
            sample.update({"png": png(label)} if "jpg" not in more else {})
            sample.update(more)
            sink.write(sample)


class IdentityViews:
    """One view: the decoded image as float, unchanged."""

    def batch_crops(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.stack([image.float() for image in images])]

    def finish(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        return views


identity_views = IdentityViews()


def labels_of(loader: object) -> list[int]:
    return [int(v) for batch in loader for v in batch.labels]  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def uneven(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """48 samples (label = sample id) in 8 shards of 3 to 9 samples."""
    folder = tmp_path_factory.mktemp("uneven")
    sizes, start, urls = [3, 9, 4, 8, 5, 7, 6, 6], 0, []
    for i, n in enumerate(sizes):
        write_tar(folder / f"train-{i:06d}.tar", list(range(start, start + n)))
        urls.append(str(folder / f"train-{i:06d}.tar"))
        start += n
    return urls


def loader_over(urls: list[str], batch_size: int = 4, **kw: object) -> object:
    args: dict[str, object] = dict(num_workers=2, shuffle_buffer=16, rank=0, world=1)
    args.update(kw)
    return build_loader(urls, 48, identity_views, 1, batch_size, 0, **args)  # type: ignore[arg-type]


def test_every_sample_once_per_epoch_across_2_ranks_x_2_workers(uneven: list[str]) -> None:
    for epoch in range(2):
        seen = []
        for rank in range(2):
            loader = loader_over(uneven, rank=rank, world=2, batch_size=1)
            loader.set_epoch(epoch)  # type: ignore[attr-defined]
            seen += labels_of(loader)
        assert sorted(seen) == list(range(48))


def test_batches_are_whole_and_len_is_exact(uneven: list[str]) -> None:
    loader = build_loader(uneven, 48, identity_views, 1, 5, 0, num_workers=2, rank=0, world=1)
    batches = list(loader)
    assert len(batches) == len(loader) == 48 // 5 and all(len(b) == 5 for b in batches)
    assert len(set(labels_of(batches))) == 45


def test_resampled_mode_gives_every_rank_the_same_number_of_batches(uneven: list[str]) -> None:
    counts = []
    for rank in range(2):
        loader = loader_over(uneven, rank=rank, world=2, samples_per_epoch=40)
        for _ in range(2):  # two epochs: the cut is at the loader, the same every epoch
            counts.append(sum(1 for _ in loader))  # type: ignore[attr-defined]
        assert len(loader) == 5  # type: ignore[arg-type]
    assert counts == [5, 5, 5, 5]


def test_same_seed_same_order_other_seed_or_epoch_other_order(uneven: list[str]) -> None:
    def order(seed: int, epoch: int, resampled: bool) -> list[int]:
        loader = build_loader(
            uneven, 48, identity_views, 1, 4, seed, num_workers=2, samples_per_epoch=32 if resampled else None
        )
        loader.set_epoch(epoch)
        return labels_of(loader)

    for resampled in (False, True):
        first = order(0, 0, resampled)
        assert first == order(0, 0, resampled)
        assert first != order(1, 0, resampled) and first != order(0, 1, resampled)


def test_train_loader_reads_the_share_of_the_rank_its_caller_names(uneven: list[str]) -> None:
    cfg = DataConfig(train=uneven[0].replace("000000", "{000000..000007}"), num_workers=0)
    shares = [train_loader(cfg, ViewSpec(), 8, 1, 1, seed=0, rank=rank, world=2) for rank in range(2)]
    assert [len(share) for share in shares] == [24, 24]
    first, second = (labels_of(share) for share in shares)
    assert sorted(first + second) == list(range(48))


def test_augmentations_in_workers_are_reproducible(uneven: list[str]) -> None:
    cfg = DataConfig(train=uneven[0].replace("000000", "{000000..000007}"), num_workers=2)
    spec = ViewSpec(kind="contrastive", global_views=2)
    first = [b.views[1] for b in train_loader(cfg, spec, 8, 1, 4, seed=3)]
    again = [b.views[1] for b in train_loader(cfg, spec, 8, 1, 4, seed=3)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


class _Marker:
    """Unpickling this creates a file: proof that a payload was (or was not) unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (str(self.path), "w")


def test_pickle_payload_is_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Marker(marker))
    shard = tmp_path / "evil-000000.tar"
    write_tar(shard, list(range(8)), extra={3: {"pyd": payload}, 5: {"seg.pickle": payload}})
    reset_skip_counts()
    loader = build_loader([str(shard)], 8, identity_views, 1, 1, 0, num_workers=0, rank=0, world=1)
    assert sorted(labels_of(loader)) == [0, 1, 2, 4, 6, 7]
    assert skip_counts()["pickle_payload"] == 2 and not marker.exists()
    assert loader.skip_counts() == skip_counts()  # what the engine reads, through the loader
    with pytest.raises(DataError, match=r"evil-000000.tar: sample 's00000[35]'.*pickle") as err:
        labels_of(build_loader([str(shard)], 8, identity_views, 1, 1, 0, num_workers=1, strict=True))
    assert "\n" not in str(err.value) and not marker.exists()
    list(wds.WebDataset(str(shard), shardshuffle=False).decode())  # webdataset's default decoders...
    assert marker.exists()  # ...do unpickle it: the payload is live, and the pitfall is real


def test_truncated_tar_and_corrupt_jpeg_are_skipped_and_counted(tmp_path: Path) -> None:
    write_tar(tmp_path / "a.tar", list(range(0, 6)), extra={2: {"jpg": b"\xff\xd8\xff\xe0garbage"}})
    write_tar(tmp_path / "b.tar", list(range(6, 12)))
    data = (tmp_path / "b.tar").read_bytes()
    (tmp_path / "b.tar").write_bytes(data[: len(data) // 2])
    write_tar(tmp_path / "c.tar", list(range(12, 18)))
    (tmp_path / "d.tar").write_bytes(b"not a tar at all" * 100)
    urls = [str(tmp_path / f"{n}.tar") for n in "abcd"]
    reset_skip_counts()
    got = labels_of(build_loader(urls, 24, identity_views, 1, 1, 0, num_workers=2, rank=0, world=1))
    counts = skip_counts()
    assert counts["bad_image"] == 1 and counts["bad_shard"] == 2, counts
    # The undecodable sample's place goes to the next good sample in the order: one repeat, the
    # batch keeps its size (the exact stream: data.md).
    assert len(got) == len(set(got)) + 1 and set(got) >= {0, 1, 3, 4, 5, *range(12, 18)} and 2 not in got
    assert set(got) - {0, 1, 3, 4, 5, *range(12, 18)} < set(range(6, 12))  # what b.tar held before the cut
    with pytest.raises(DataError, match="data.strict"):
        labels_of(build_loader(urls, 24, identity_views, 1, 1, 0, strict=True, rank=0, world=1))


def test_too_few_samples_is_a_one_line_error_too_few_shards_only_a_warning(
    uneven: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    exact = build_loader(uneven, 48, identity_views, 1, 4, 0, num_workers=8, rank=0, world=2)
    assert len(exact) == 6 and not caplog.records  # workers take batches, not shards
    build_loader(uneven, 48, identity_views, 1, 4, 0, num_workers=8, world=2, samples_per_epoch=48)
    assert "8 shard(s) but 2 process(es) x 8 worker(s) read it" in caplog.text  # resampled
    with pytest.raises(DataError, match="fewer than 1 process"):
        build_loader(uneven, 48, identity_views, 1, 64, 0)
    with pytest.raises(DataError, match="do not exist"):
        resolve(uneven[0].replace("000000", "{000000..000009}"))


def test_missing_shard_pattern_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = f"data.train={tmp_path}/train-{{000000..000003}}.tar"
    assert main(["pretrain", "digits/supervised", *TINY, missing, "--out", str(tmp_path / "run")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "4 of 4 shards do not exist" in lines[0]
    assert main(["shards", str(tmp_path / "nothing.csv"), "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "run").exists()


def test_digits_shards_read_by_plain_webdataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["shards", "digits", "--out", str(tmp_path)]) == 0
    assert "train 1257 in 16 shards, test 540 in 16 shards" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["classes"] == [str(i) for i in range(10)] and manifest["splits"]["test"]["count"] == 540
    pattern = str(tmp_path / manifest["splits"]["train"]["pattern"])
    plain = wds.WebDataset(pattern, shardshuffle=False).to_tuple("__key__", "png", "cls")
    samples = [(key, np.asarray(Image.open(io.BytesIO(img))), int(cls)) for key, img, cls in plain]
    assert len({key for key, _, _ in samples}) == 1257 and samples[0][1].shape == (8, 8)
    images, labels = load_images(str(tmp_path), "test", 8, 1)  # a shard folder: its test split
    ref_images, ref_labels = digits_split("test")  # (N, 1, 8, 8) in [0, 1], straight from scikit-learn
    assert torch.equal(labels, ref_labels) and (images - ref_images).abs().max() <= 0.5 / 255 + 1e-6


def test_plain_tarwriter_shards_train_in_ssl_vit(uneven: list[str], tmp_path: Path) -> None:
    pattern = uneven[0].replace("000000", "{000000..000007}")
    assert len(class_names(pattern)) == 48  # no manifest: labels found by a scan
    out = tmp_path / "run"
    argv = ["pretrain", "digits/supervised", *TINY, "train.batch_size=8", "train.max_steps=2"]
    assert main([*argv, f"data.train={pattern}", "--out", str(out), "--quiet"]) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_image_folder_and_csv_sources(tmp_path: Path) -> None:
    root = tmp_path / "folder"
    for c, name in enumerate(["cat", "dog"]):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((10, 12, 3), 40 * i + c, np.uint8)).save(root / name / f"{i}.png")
    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(root / "dog" / "x.jpg", quality=90)
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    manifest = write_shards(str(root), tmp_path / "out", shard_size=2, val_fraction=0.3)
    assert manifest["classes"] == ["cat", "dog"] and manifest["skipped"]["count"] == 1
    assert manifest["splits"]["train"]["count"] + manifest["splits"]["val"]["count"] == 7
    assert manifest["images"]["width"] == {"min": 9.0, "max": 12.0, "mean": pytest.approx(11.57, abs=0.01)}
    members = [
        n for s in (tmp_path / "out").glob("*.tar") for n in wds.WebDataset(str(s), shardshuffle=False)
    ]
    assert sum("jpg" in m for m in members) == 1  # JPEG bytes kept as found, not re-encoded
    images, labels = load_images(str(tmp_path / "out"), "test", 8, 3)  # `val` stands in for `test`
    assert images.shape[1:] == (3, 8, 8) and len(labels) == manifest["splits"]["val"]["count"] >= 1
    with pytest.raises(DataError, match="broken.jpg: unreadable image"):
        write_shards(str(root), tmp_path / "strict", strict=True)
    table = tmp_path / "list.csv"
    table.write_text("path\n" + "\n".join(f"folder/cat/{i}.png" for i in range(3)))
    write_shards(str(table), tmp_path / "csv")
    unlabelled = resolve(str(tmp_path / "csv"))
    assert unlabelled.count == 3 and unlabelled.classes is None
    loader = build_loader(unlabelled.urls, 3, identity_views, 3, 3, 0, rank=0, world=1)
    assert labels_of(loader) == [-1, -1, -1]


def test_builtin_cache_is_written_once_even_by_racing_writers(tmp_path: Path) -> None:
    spec = parse_builtin("shapes:60:20")
    assert spec is not None
    found: list[Path] = []
    threads = [
        threading.Thread(target=lambda: found.append(builtin_shards(spec, str(tmp_path)))) for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(found) == 2 and found[0] == found[1] and found[0].parent == tmp_path
    assert [p.name for p in tmp_path.iterdir()] == [found[0].name]  # no temporary folder left behind
    cfg = DataConfig(train="shapes:60:20", cache_dir=str(tmp_path), mean=[0.5] * 3, std=[0.5] * 3)
    batch = next(iter(train_loader(cfg, ViewSpec(), 32, 3, 8, seed=0)))
    assert isinstance(batch, Batch) and batch.views[0].shape == (8, 3, 32, 32)
