"""bit_core.augment: crop/flip windows, [-1, 1] scaling, MixUp, eval resize."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bit_core.augment import (
    eval_batch,
    mixup,
    random_crop_flip,
    step_generator,
    to_unit_range,
    train_batch,
)


def _position_images(n: int, height: int, width: int) -> torch.Tensor:
    """images[i, 0, y, x] = y, images[i, 1, y, x] = x, images[i, 2, y, x] = i."""
    images = torch.empty(n, 3, height, width, dtype=torch.uint8)
    images[:, 0] = torch.arange(height, dtype=torch.uint8)[:, None]
    images[:, 1] = torch.arange(width, dtype=torch.uint8)[None, :]
    images[:, 2] = torch.arange(n, dtype=torch.uint8)[:, None, None]
    return images


def _window_offsets(crops: torch.Tensor) -> list[tuple[int, int, bool]]:
    """(top, left, flipped) of each crop, checking it is an exact window of the input."""
    n, _, crop, _ = crops.shape
    ramp = torch.arange(crop, dtype=torch.int64)
    found = []
    for i in range(n):
        rows, cols, ids = crops[i].to(torch.int64)
        top = int(rows[0, 0])
        assert torch.equal(rows, (top + ramp)[:, None].expand(crop, crop))
        assert (ids == i).all()  # the window comes from its own image
        flipped = bool(cols[0, 0] > cols[0, -1]) if crop > 1 else False
        left = int(cols[0, -1]) if flipped else int(cols[0, 0])
        expected_cols = left + ramp.flip(0) if flipped else left + ramp
        assert torch.equal(cols, expected_cols[None, :].expand(crop, crop))
        found.append((top, left, flipped))
    return found


def test_random_crop_flip_returns_exact_windows() -> None:
    images = _position_images(64, 12, 20)
    crops = random_crop_flip(images, 8, step_generator(0, 0))

    assert crops.shape == (64, 3, 8, 8)
    assert crops.dtype == torch.uint8
    assert crops.is_contiguous()
    offsets = _window_offsets(crops)
    for top, left, _ in offsets:
        assert 0 <= top <= 12 - 8
        assert 0 <= left <= 20 - 8
    flips = [flipped for _, _, flipped in offsets]
    assert any(flips) and not all(flips)  # 64 fair coins: both outcomes appear
    assert len({(top, left) for top, left, _ in offsets}) > 1


def test_random_crop_flip_float_input_keeps_dtype() -> None:
    images = _position_images(4, 10, 10).float()
    crops = random_crop_flip(images, 6, step_generator(1, 1))
    assert crops.dtype == torch.float32
    _window_offsets(crops)


def test_random_crop_flip_full_size_crop_is_identity_or_mirror() -> None:
    images = _position_images(16, 9, 9)
    crops = random_crop_flip(images, 9, step_generator(3, 0))
    for i, (top, left, flipped) in enumerate(_window_offsets(crops)):
        assert (top, left) == (0, 0)
        expected = images[i].flip(-1) if flipped else images[i]
        assert torch.equal(crops[i], expected)


def test_random_crop_flip_is_deterministic_per_seed_and_step() -> None:
    images = _position_images(32, 16, 16)
    first = random_crop_flip(images, 10, step_generator(5, 17))
    again = random_crop_flip(images, 10, step_generator(5, 17))
    other_step = random_crop_flip(images, 10, step_generator(5, 18))
    other_seed = random_crop_flip(images, 10, step_generator(6, 17))
    assert torch.equal(first, again)
    assert not torch.equal(first, other_step)
    assert not torch.equal(first, other_seed)


def test_random_crop_flip_larger_than_image_raises() -> None:
    images = _position_images(2, 8, 12)
    with pytest.raises(ValueError, match="cannot crop 10x10 from 8x12"):
        random_crop_flip(images, 10, np.random.default_rng(0))
    with pytest.raises(ValueError, match="cannot crop 13x13"):
        random_crop_flip(images, 13, np.random.default_rng(0))


def test_to_unit_range_endpoints() -> None:
    images = torch.tensor([0, 255, 51], dtype=torch.uint8)
    out = to_unit_range(images)
    assert out.dtype == torch.float32
    assert out[0].item() == pytest.approx(-1.0)
    assert out[1].item() == pytest.approx(1.0)
    assert out[2].item() == pytest.approx(51 * 2 / 255 - 1)
    assert images.tolist() == [0, 255, 51]  # the uint8 input is left alone


def test_train_batch_crops_and_scales() -> None:
    images = _position_images(8, 12, 12)
    out = train_batch(images, 6, step_generator(0, 4))
    expected = to_unit_range(random_crop_flip(images, 6, step_generator(0, 4)))
    assert out.shape == (8, 3, 6, 6)
    assert out.dtype == torch.float32
    assert torch.equal(out, expected)
    assert out.min() >= -1.0 and out.max() <= 1.0


@pytest.mark.parametrize("alpha", [0.1, 1.0, 5.0])
def test_mixup_mixes_with_the_returned_permutation(alpha: float) -> None:
    rng = step_generator(2, 3)
    images = torch.randn(6, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    mixed, permutation, lam = mixup(images, alpha, rng)

    assert isinstance(lam, float)
    assert 0.0 <= lam <= 1.0
    assert sorted(permutation.tolist()) == list(range(6))
    assert mixed.shape == images.shape
    torch.testing.assert_close(mixed, lam * images + (1.0 - lam) * images[permutation])
    # Same generator state -> same lambda and partners.
    mixed_again, permutation_again, lam_again = mixup(images, alpha, step_generator(2, 3))
    assert lam_again == lam
    assert torch.equal(permutation_again, permutation)
    assert torch.equal(mixed_again, mixed)


def test_mixup_lambdas_vary_across_steps() -> None:
    images = torch.zeros(4, 3, 2, 2)
    lams = [mixup(images, 0.2, step_generator(0, step))[2] for step in range(20)]
    assert all(0.0 <= lam <= 1.0 for lam in lams)
    assert len(set(lams)) == 20


def test_eval_batch_resizes_to_crop() -> None:
    images = torch.full((2, 3, 20, 30), 200, dtype=torch.uint8)
    images[1] = 0
    out = eval_batch(images, 16)
    assert out.shape == (2, 3, 16, 16)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out[0], torch.full((3, 16, 16), 200 * 2 / 255 - 1))
    torch.testing.assert_close(out[1], torch.full((3, 16, 16), -1.0))


def test_eval_batch_at_crop_size_only_scales() -> None:
    images = _position_images(3, 8, 8)
    out = eval_batch(images, 8)
    assert out.shape == (3, 3, 8, 8)
    assert torch.equal(out, to_unit_range(images))


def test_to_unit_range_returns_a_new_tensor_for_float_input() -> None:
    x = torch.full((1, 3, 2, 2), 255.0)
    out = to_unit_range(x)
    assert out is not x and float(x.max()) == 255.0 and float(out.max()) == 1.0
