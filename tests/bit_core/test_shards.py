"""WebDataset-format shards: disjoint per rank, exact resume, and a 2-rank run on them."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch

from bit_core.pretrain_run import load_data, write_spec
from bit_core.shards import ShardSet, shard_batches
from bit_core.train import RunConfig
from bit_core.upstream import upstream_plan
from tests.factories import make_multilabel_manifest
from tests.torchrun import records, torchrun


def write_shards(root: Path, count: int = 4) -> Path:
    """Pack the generated multi-label images into `count` tar shards + classes.txt."""
    manifest = make_multilabel_manifest(root / "src")
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    out = root / "shards"
    out.mkdir()
    for shard in range(count):
        with tarfile.open(out / f"part-{shard:03d}.tar", "w") as archive:
            for index, row in enumerate(rows[shard::count]):
                key = f"s{shard}_{index:04d}"
                for suffix, data in (
                    (".png", (root / "src" / row["uri"]).read_bytes()),
                    (".cls", ",".join(row["labels"]).encode()),
                ):
                    info = tarfile.TarInfo(key + suffix)
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
    (out / "classes.txt").write_text("\n".join(f"c{i}" for i in range(8)))
    return out


def test_ranks_read_disjoint_shards_and_resume_exactly(tmp_path: Path):
    shards = ShardSet.from_dir(write_shards(tmp_path))
    assert len(shards) == 64 and shards.multi_label and len(shards.classes) == 8
    assert set(shards.for_rank(0, 2)).isdisjoint(shards.for_rank(1, 2))
    assert isinstance(load_data(str(tmp_path / "shards")), ShardSet)

    def run(rank: int, steps: range) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [
            (pixels, targets)
            for _, pixels, targets in shard_batches(
                shards, rank=rank, world=2, batch_size=8, size=16, steps=steps, seed=3
            )
        ]

    whole = run(0, range(0, 6))
    resumed = run(0, range(4, 6))
    assert all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        for a, b in zip(whole[4:], resumed, strict=True)
    )
    assert whole[0][1].sum(1).min() >= 1  # every sample has at least one label


def test_missing_classes_file_is_explained(tmp_path: Path):
    directory = write_shards(tmp_path)
    (directory / "classes.txt").unlink()
    with pytest.raises(ValueError, match=r"classes\.txt"):
        ShardSet.from_dir(directory)


@pytest.mark.slow
def test_two_ranks_pretrain_on_shards(tmp_path: Path):
    shards = write_shards(tmp_path)
    plan = upstream_plan(
        64, 8, multi_label=True, global_batch=16, total_steps=8, resolution=32, base_lr=0.03
    )
    run_dir = tmp_path / "run"
    write_spec(
        run_dir,
        arch="R14x0.5",
        data=str(shards),
        plan=plan,
        config=RunConfig(checkpoint_every=4, device="cpu"),
    )
    process = torchrun(run_dir)
    assert process.wait(timeout=300) == 0, (run_dir / "torchrun.log").read_text()[-3000:]
    assert records(run_dir)[-1] == {**records(run_dir)[-1], "outcome": "finished", "step": 8}
    assert (run_dir / "rank0.sha256").read_text() == (run_dir / "rank1.sha256").read_text()
