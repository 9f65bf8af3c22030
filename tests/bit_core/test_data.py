"""bit_core.data: folder/pair loading, the (seed, step) sampler, batch iteration."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import bit_core.data
from bit_core.data import LabeledImages, StepSampler, iterate_batches


def _write_png(path: Path, size: tuple[int, int] = (12, 10), value: int = 0) -> Path:
    """An RGB PNG of (height, width) `size` whose pixels depend on `value`."""
    height, width = size
    rng = np.random.default_rng(value)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def _png_bytes(size: tuple[int, int], value: int = 0) -> bytes:
    height, width = size
    rng = np.random.default_rng(value)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _folder(root: Path, counts: dict[str, int]) -> Path:
    value = 0
    for name, count in counts.items():
        for i in range(count):
            _write_png(root / name / f"{i}.png", value=value)
            value += 1
    return root


# --- LabeledImages ----------------------------------------------------------------------


def test_from_folder_sorts_classes_and_labels_follow_folders(tmp_path: Path) -> None:
    root = _folder(tmp_path / "set", {"zebra": 2, "apple": 3, "mango": 1})
    images = LabeledImages.from_folder(root)

    assert images.classes == ("apple", "mango", "zebra")
    assert len(images) == 6
    for source, label, name in zip(images.sources, images.labels, images.names, strict=True):
        assert Path(source).parent.name == images.classes[label]
        assert name == str(source)
    assert images.class_counts() == {"apple": 3, "mango": 1, "zebra": 2}


def test_from_folder_skips_hidden_files_and_directories(tmp_path: Path) -> None:
    root = _folder(tmp_path / "set", {"cat": 1, "dog": 1})
    (root / "cat" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "cat" / "._0.png").write_bytes(b"AppleDouble")
    (root / ".cache").mkdir()
    _write_png(root / ".cache" / "x.png")

    images = LabeledImages.from_folder(root)
    assert images.classes == ("cat", "dog")
    assert sorted(Path(s).name for s in images.sources) == ["0.png", "0.png"]


def test_from_folder_includes_images_in_nested_subdirectories(tmp_path: Path) -> None:
    root = _folder(tmp_path / "set", {"cat": 1, "dog": 1})
    _write_png(root / "cat" / "more" / "deep.png")
    images = LabeledImages.from_folder(root)
    assert images.class_counts() == {"cat": 2, "dog": 1}


def test_from_folder_empty_class_raises_naming_it(tmp_path: Path) -> None:
    root = _folder(tmp_path / "set", {"cat": 2})
    (root / "hollow").mkdir()
    (root / "hollow" / ".hidden").write_text("only hidden files here")
    with pytest.raises(ValueError, match="class 'hollow' has no images"):
        LabeledImages.from_folder(root)


def test_from_folder_rejects_a_file_path(tmp_path: Path) -> None:
    file = _write_png(tmp_path / "single.png")
    with pytest.raises(ValueError, match="not a directory"):
        LabeledImages.from_folder(file)
    with pytest.raises(ValueError, match="not a directory"):
        LabeledImages.from_folder(tmp_path / "missing")


def test_from_folder_without_class_dirs_raises(tmp_path: Path) -> None:
    _write_png(tmp_path / "flat" / "a.png")
    with pytest.raises(ValueError, match="no class sub-directories"):
        LabeledImages.from_folder(tmp_path / "flat")


def test_from_folder_with_explicit_class_order(tmp_path: Path) -> None:
    root = _folder(tmp_path / "set", {"a": 1, "b": 1})
    images = LabeledImages.from_folder(root, classes=["b", "a", "c"])
    assert images.classes == ("b", "a", "c")
    by_folder = {
        Path(source).parent.name: label
        for source, label in zip(images.sources, images.labels, strict=True)
    }
    assert by_folder == {"b": 0, "a": 1}
    assert images.class_counts() == {"b": 1, "a": 1, "c": 0}


def test_from_pairs_with_bytes_sources() -> None:
    pairs = [(_png_bytes((8, 8), 0), "dog"), (_png_bytes((8, 8), 1), "cat")]
    images = LabeledImages.from_pairs(pairs)
    assert images.classes == ("cat", "dog")
    assert images.labels == (1, 0)
    assert images.names == ("image #0", "image #1")
    assert images.sources[0] == pairs[0][0]


def test_from_pairs_unknown_label_with_explicit_classes_raises() -> None:
    pairs = [(b"x", "cat"), (b"y", "wolf")]
    with pytest.raises(ValueError, match=r"\['wolf'\] are not among the classes"):
        LabeledImages.from_pairs(pairs, classes=["cat", "dog"])


def test_from_pairs_empty_raises() -> None:
    with pytest.raises(ValueError, match="no images given"):
        LabeledImages.from_pairs([])


def test_class_counts_counts_each_label() -> None:
    pairs = [(b"", label) for label in ["b", "a", "b", "c", "b"]]
    images = LabeledImages.from_pairs(pairs, classes=["a", "b", "c", "d"])
    assert images.class_counts() == {"a": 1, "b": 3, "c": 1, "d": 0}


def test_typical_hw_is_the_median_of_header_sizes(tmp_path: Path) -> None:
    sizes = [(10, 40), (30, 20), (50, 60), (20, 10), (90, 30)]  # (height, width)
    pairs = [
        (str(_write_png(tmp_path / f"{i}.png", size=size)), "x") for i, size in enumerate(sizes)
    ]
    pairs.append((_png_bytes((40, 50)), "x"))
    # heights 10 30 50 20 90 40 -> median 35; widths 40 20 60 10 30 50 -> median 35
    images = LabeledImages.from_pairs(pairs)
    assert images.typical_hw() == (35, 35)
    # Odd count: plain middle value.
    assert LabeledImages.from_pairs(pairs[:5]).typical_hw() == (30, 30)


# --- StepSampler ------------------------------------------------------------------------


def test_sampler_is_a_pure_function_of_seed_and_step() -> None:
    first, second = StepSampler(23, 5, seed=7), StepSampler(23, 5, seed=7)
    forward = [first.indices(step).tolist() for step in range(12)]
    # Another instance, queried in a different order, gives the same batches.
    backward = {step: second.indices(step).tolist() for step in reversed(range(12))}
    assert forward == [backward[step] for step in range(12)]
    assert first.indices(3).tolist() == forward[3]  # revisiting an old epoch


def test_sampler_with_replacement_is_a_pure_function_of_seed_and_step() -> None:
    first, second = StepSampler(3, 8, seed=1), StepSampler(3, 8, seed=1)
    assert [first.indices(s).tolist() for s in range(4)] == [
        second.indices(s).tolist() for s in reversed(range(4))
    ][::-1]


def test_sampler_different_seeds_differ() -> None:
    a, b = StepSampler(50, 8, seed=0), StepSampler(50, 8, seed=1)
    assert [a.indices(s).tolist() for s in range(3)] != [b.indices(s).tolist() for s in range(3)]
    c, d = StepSampler(4, 16, seed=0), StepSampler(4, 16, seed=1)
    assert [c.indices(s).tolist() for s in range(3)] != [d.indices(s).tolist() for s in range(3)]


def test_sampler_without_replacement_covers_each_example_once_per_epoch() -> None:
    sampler = StepSampler(10, 4, seed=3)
    assert not sampler.with_replacement
    batches = [sampler.indices(step) for step in range(5)]  # 20 positions = 2 epochs
    for batch in batches:
        assert batch.shape == (4,)
        assert batch.dtype == np.int64
        assert ((batch >= 0) & (batch < 10)).all()
    flat = np.concatenate(batches)
    counts = Counter(flat.tolist())
    assert sorted(counts) == list(range(10))
    assert set(counts.values()) == {2}
    # Each epoch (consecutive 10 positions) is a permutation; the two epochs differ.
    assert sorted(flat[:10].tolist()) == list(range(10))
    assert sorted(flat[10:].tolist()) == list(range(10))
    assert flat[:10].tolist() != flat[10:].tolist()
    # Within one epoch, a batch never repeats an index.
    assert len(set(batches[0].tolist()) | set(batches[1].tolist())) == 8


def test_sampler_with_exactly_batch_examples() -> None:
    sampler = StepSampler(6, 6, seed=0)
    assert not sampler.with_replacement
    for step in range(3):
        assert sorted(sampler.indices(step).tolist()) == list(range(6))


def test_sampler_with_fewer_examples_than_batch_samples_with_replacement() -> None:
    sampler = StepSampler(3, 8, seed=5)
    assert sampler.with_replacement
    seen: set[int] = set()
    for step in range(10):
        batch = sampler.indices(step)
        assert batch.shape == (8,)
        assert ((batch >= 0) & (batch < 3)).all()
        seen.update(batch.tolist())
    assert seen == {0, 1, 2}
    assert len(set(sampler.indices(0).tolist())) < 8  # repeats are unavoidable


def test_sampler_state_dict_and_compatibility() -> None:
    sampler = StepSampler(10, 4, seed=3)
    state = sampler.state_dict()
    assert state == {"num_examples": 10, "batch_size": 4, "seed": 3}
    StepSampler(10, 4, seed=3).check_compatible(state)  # no error
    with pytest.raises(ValueError, match="cannot resume"):
        StepSampler(10, 8, seed=3).check_compatible(state)
    with pytest.raises(ValueError, match="cannot resume"):
        StepSampler(11, 4, seed=3).check_compatible(state)
    with pytest.raises(ValueError, match="cannot resume"):
        StepSampler(10, 4, seed=4).check_compatible(state)


# --- iterate_batches --------------------------------------------------------------------


@pytest.fixture
def small_set(tmp_path: Path) -> LabeledImages:
    root = tmp_path / "set"
    for i in range(3):
        _write_png(root / "a" / f"{i}.png", size=(10 + i, 14), value=i)
    for i in range(4):
        _write_png(root / "b" / f"{i}.png", size=(16, 9 + i), value=10 + i)
    return LabeledImages.from_folder(root)


def test_iterate_batches_preloaded(small_set: LabeledImages) -> None:
    sampler = StepSampler(len(small_set), 3, seed=0)
    out = list(iterate_batches(small_set, sampler, 8, range(2, 6)))

    assert [step for step, _, _ in out] == [2, 3, 4, 5]
    for step, pixels, labels in out:
        assert pixels.dtype == torch.uint8
        assert pixels.shape == (3, 3, 8, 8)
        assert labels.dtype == torch.long
        assert labels.shape == (3,)
        expected = sampler.indices(step)
        assert labels.tolist() == [small_set.labels[i] for i in expected]
        for row, index in enumerate(expected):
            want = bit_core.data.load_square(small_set.sources[index], 8)
            assert torch.equal(pixels[row], torch.from_numpy(want))


def test_iterate_batches_streaming_matches_preloaded(
    small_set: LabeledImages, monkeypatch: pytest.MonkeyPatch
) -> None:
    sampler = StepSampler(len(small_set), 4, seed=9)
    steps = range(1, 5)
    preloaded = list(iterate_batches(small_set, sampler, 8, steps))

    decoded: list[int] = []
    original = bit_core.data.SquareImages.__getitem__

    def counting(self: bit_core.data.SquareImages, index: int) -> tuple[torch.Tensor, int]:
        decoded.append(index)
        return original(self, index)

    monkeypatch.setattr(bit_core.data, "PRELOAD_LIMIT_BYTES", 0)
    monkeypatch.setattr(bit_core.data.SquareImages, "__getitem__", counting)
    streamed = list(iterate_batches(small_set, sampler, 8, steps, num_workers=0))

    # The streaming path decodes per sampled index (4 steps x 4), not the whole set once.
    assert len(decoded) == 16
    assert [s for s, _, _ in streamed] == list(steps)
    for (step_a, pixels_a, labels_a), (step_b, pixels_b, labels_b) in zip(
        preloaded, streamed, strict=True
    ):
        assert step_a == step_b
        assert pixels_b.dtype == torch.uint8
        assert pixels_b.shape == pixels_a.shape == (4, 3, 8, 8)
        assert torch.equal(pixels_a, pixels_b)
        assert labels_b.dtype == torch.long
        assert torch.equal(labels_a, labels_b)


def test_iterate_batches_with_replacement_few_shot(small_set: LabeledImages) -> None:
    sampler = StepSampler(len(small_set), 16, seed=2)
    ((step, pixels, labels),) = list(iterate_batches(small_set, sampler, 4, range(7, 8)))
    assert step == 7
    assert pixels.shape == (16, 3, 4, 4)
    assert labels.tolist() == [small_set.labels[i] for i in sampler.indices(7)]


def test_from_folder_skips_files_inside_hidden_subfolders(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "cat" / ".ipynb_checkpoints").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "cat" / "a.png")
    Image.new("RGB", (8, 8)).save(root / "cat" / ".ipynb_checkpoints" / "a-checkpoint.png")
    images = LabeledImages.from_folder(root)
    assert len(images) == 1 and images.names[0].endswith("cat/a.png")
