"""BiT-HyperRule, table-driven at its boundaries, against a re-statement of the official code."""

from __future__ import annotations

import itertools
import json

import pytest

from bit_core.hyperrule import (
    BASE_LR,
    OVERRIDABLE,
    Plan,
    hyperrule,
    lr_at,
    mixup_alpha,
    resolution,
    scale_supports,
    schedule_supports,
)

SMALL = (100, 200, 300, 400, 500)
MEDIUM = (500, 3000, 6000, 9000, 10_000)
LARGE = (500, 6000, 12_000, 18_000, 20_000)


# An independent re-statement of big_transfer's bit_hyperrule.py (get_schedule / get_lr).
def official_get_schedule(dataset_size: int) -> list[int]:
    if dataset_size < 20_000:
        return [100, 200, 300, 400, 500]
    elif dataset_size < 500_000:
        return [500, 3000, 6000, 9000, 10_000]
    else:
        return [500, 6000, 12_000, 18_000, 20_000]


def official_get_lr(step: int, dataset_size: int, base_lr: float = 0.003) -> float | None:
    supports = official_get_schedule(dataset_size)
    if step < supports[0]:  # linear warmup
        return base_lr * step / supports[0]
    elif step >= supports[-1]:  # end of training
        return None
    else:  # staircase decays by a factor of 10
        for s in supports[1:]:
            if s < step:
                base_lr /= 10
        return base_lr


@pytest.mark.parametrize(
    ("num_examples", "supports", "alpha"),
    [
        (1, SMALL, 0.0),
        (19_999, SMALL, 0.0),
        (20_000, MEDIUM, 0.1),
        (499_999, MEDIUM, 0.1),
        (500_000, LARGE, 0.1),
        (10_000_000, LARGE, 0.1),
    ],
)
def test_schedule_and_mixup_by_dataset_size(
    num_examples: int, supports: tuple[int, ...], alpha: float
) -> None:
    assert schedule_supports(num_examples) == supports
    assert tuple(official_get_schedule(num_examples)) == supports
    assert mixup_alpha(num_examples) == alpha
    plan = hyperrule(num_examples, (224, 224))
    assert plan.supports == supports
    assert plan.total_steps == supports[-1]
    assert plan.mixup_alpha == alpha


@pytest.mark.parametrize(
    ("image_hw", "arch", "rule", "expected"),
    [
        ((95, 96), None, "paper", (160, 128)),
        ((96, 95), None, "paper", (160, 128)),
        ((96, 96), None, "paper", (448, 384)),
        ((32, 32), None, "paper", (160, 128)),
        ((1, 9215), None, "paper", (160, 128)),  # by area, not by side
        ((1, 9216), None, "paper", (448, 384)),
        ((375, 500), None, "paper", (448, 384)),
        ((96, 96), "R50x1", "paper", (448, 384)),
        ((96, 96), "BiT-M-R152x2", "paper", (448, 384)),
        ((96, 96), "R152x4", "paper", (512, 480)),
        ((375, 500), "BiT-M-R152x4", "paper", (512, 480)),
        ((375, 500), "BiT-S-R152x4", "paper", (512, 480)),
        ((95, 96), "R152x4", "paper", (160, 128)),
        ((96, 96), None, "official", (512, 480)),
        ((96, 96), "R50x1", "official", (512, 480)),
        ((95, 96), "R50x1", "official", (160, 128)),
        ((95, 96), "R152x4", "official", (160, 128)),
    ],
)
def test_resolution_by_area(
    image_hw: tuple[int, int], arch: str | None, rule: str, expected: tuple[int, int]
) -> None:
    assert resolution(image_hw, arch, rule) == expected
    plan = hyperrule(1000, image_hw, arch=arch, resolution_rule=rule)
    assert (plan.precrop, plan.crop) == expected
    assert plan.resolution_rule == rule


def test_resolution_r152x4_ilsvrc2012_name() -> None:
    assert resolution((224, 224), "BiT-M-R152x4-ILSVRC2012") == (512, 480)


def test_unknown_resolution_rule() -> None:
    with pytest.raises(ValueError, match="resolution rule"):
        resolution((224, 224), None, "tf")
    with pytest.raises(ValueError, match="resolution rule"):
        hyperrule(1000, (224, 224), resolution_rule="tf")


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, 0.0),
        (1, 0.003 / 500),
        (250, 0.0015),  # warmup midpoint
        (499, 0.003 * 499 / 500),
        (500, 0.003),  # == supports[0]: warmup done
        (501, 0.003),
        (3000, 0.003),  # == supports[1]: not passed yet, not decayed
        (3001, 0.0003),
        (6000, 0.0003),
        (6001, 0.00003),
        (9000, 0.00003),
        (9001, 0.000003),
        (9999, 0.000003),
        (10_000, None),  # == supports[-1]: training is over
        (10_001, None),
        (50_000, None),
    ],
)
def test_lr_at_table(step: int, expected: float | None) -> None:
    got = lr_at(step, MEDIUM, BASE_LR)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected, rel=1e-12, abs=0)
    assert hyperrule(100_000, (224, 224)).lr_at(step) == got


@pytest.mark.parametrize("num_examples", [10, 19_999, 20_000, 499_999, 500_000])
@pytest.mark.parametrize("base_lr", [0.003, 0.01])
def test_lr_at_matches_official_get_lr_everywhere(num_examples: int, base_lr: float) -> None:
    supports = schedule_supports(num_examples)
    for step in range(supports[-1] + 3):
        expected = official_get_lr(step, num_examples, base_lr)
        got = lr_at(step, supports, base_lr)
        if expected is None:
            assert got is None, step
        else:
            assert got == pytest.approx(expected, rel=1e-12, abs=0), step


def test_lr_schedule_shape() -> None:
    lrs = [lr_at(step, SMALL, BASE_LR) for step in range(500)]
    assert all(lr is not None for lr in lrs)
    assert lrs[:100] == sorted(lrs[:100])  # warmup rises
    assert sorted(set(lrs[100:]), reverse=True) == pytest.approx([3e-3, 3e-4, 3e-5, 3e-6])
    assert lr_at(500, SMALL, BASE_LR) is None


def test_defaults() -> None:
    plan = hyperrule(50_000, (224, 224))
    assert plan.base_lr == BASE_LR == 0.003
    assert plan.batch_size == 512
    assert plan.momentum == 0.9
    assert plan.weight_decay == 0.0
    assert plan.mode == "full"
    assert plan.overrides == {}
    assert plan.notes == []


@pytest.mark.parametrize(
    ("batch_size", "base_lr"),
    [(128, 0.003 * 128 / 512), (1, 0.003 / 512), (512, 0.003), (1024, 0.006)],
)
def test_batch_size_scales_lr(batch_size: int, base_lr: float) -> None:
    plan = hyperrule(50_000, (224, 224), batch_size=batch_size)
    assert plan.batch_size == batch_size
    assert plan.base_lr == pytest.approx(base_lr, rel=1e-12)
    scaled_notes = [note for note in plan.notes if "base_lr" in note]
    if batch_size == 512:
        assert scaled_notes == []
    else:
        assert len(scaled_notes) == 1
        assert str(batch_size) in scaled_notes[0]
    assert plan.lr_at(plan.supports[0]) == pytest.approx(base_lr, rel=1e-12)


def test_batch_128_lr_is_0_00075() -> None:
    plan = hyperrule(50_000, (224, 224), batch_size=128)
    assert plan.base_lr == pytest.approx(0.00075, rel=1e-12)
    assert any("scaled" in note for note in plan.notes)


def test_explicit_base_lr_is_kept() -> None:
    plan = hyperrule(50_000, (224, 224), batch_size=128, base_lr=0.01)
    assert plan.base_lr == 0.01
    assert not any("base_lr" in note for note in plan.notes)
    assert plan.overrides == {"batch_size": 128, "base_lr": 0.01}


def test_small_set_is_sampled_with_replacement() -> None:
    plan = hyperrule(40, (32, 32))
    assert any("with replacement" in note for note in plan.notes)
    assert not any("with replacement" in n for n in hyperrule(512, (32, 32)).notes)


def test_total_steps_stretches_exactly() -> None:
    plan = hyperrule(100_000, (224, 224), total_steps=1000)
    assert plan.supports == (50, 300, 600, 900, 1000)
    assert plan.total_steps == 1000
    assert plan.overrides == {"total_steps": 1000}
    assert any("stretched" in note for note in plan.notes)
    assert scale_supports(SMALL, 5000) == (1000, 2000, 3000, 4000, 5000)
    assert scale_supports(LARGE, 20_000) == LARGE


@pytest.mark.parametrize("supports", [SMALL, MEDIUM, LARGE])
@pytest.mark.parametrize("total_steps", [*range(5, 40), 99, 101, 499, 777, 12_345, 100_000])
def test_total_steps_keeps_supports_strictly_increasing(
    supports: tuple[int, ...], total_steps: int
) -> None:
    scaled = scale_supports(supports, total_steps)
    assert len(scaled) == 5
    assert scaled[-1] == total_steps
    assert scaled[0] >= 1
    assert all(b > a for a, b in itertools.pairwise(scaled))
    # Proportions kept within rounding (and the squeeze needed to stay increasing).
    for original, new in zip(supports, scaled, strict=True):
        assert abs(new - original * total_steps / supports[-1]) < 5


def test_total_steps_too_small() -> None:
    with pytest.raises(ValueError, match="total_steps"):
        hyperrule(1000, (224, 224), total_steps=4)


def test_custom_supports_with_total_steps_stay_positive() -> None:
    plan = hyperrule(1000, (224, 224), supports=(1, 2, 3, 4, 1000), total_steps=10)
    assert plan.supports[0] >= 1
    assert all(b > a for a, b in itertools.pairwise(plan.supports))


def test_supports_override() -> None:
    plan = hyperrule(1000, (224, 224), supports=[10, 20, 30, 40, 50])
    assert plan.supports == (10, 20, 30, 40, 50)
    for bad in ([10, 20, 30, 40], [10, 20, 20, 40, 50], [0, 20, 30, 40, 50]):
        with pytest.raises(ValueError, match="supports"):
            hyperrule(1000, (224, 224), supports=bad)


def test_unknown_override_raises() -> None:
    with pytest.raises(ValueError, match="learning_rate") as info:
        hyperrule(1000, (224, 224), learning_rate=0.1)
    for name in OVERRIDABLE:
        assert name in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "partial"}, "mode"),
        ({"crop": 500}, "crop"),
        ({"crop": 0}, "crop"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_invalid_overrides(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        hyperrule(1000, (224, 224), **kwargs)


def test_num_examples_must_be_positive() -> None:
    with pytest.raises(ValueError, match="num_examples"):
        hyperrule(0, (224, 224))


def test_overrides_record_what_was_set() -> None:
    plan = hyperrule(
        1000,
        (224, 224),
        arch="R50x1",
        batch_size=64,
        precrop=256,
        crop=224,
        mixup_alpha=0.2,
        mode="linear",
        base_lr=None,  # None means "not set" and is not recorded
    )
    assert plan.overrides == {
        "batch_size": 64,
        "precrop": 256,
        "crop": 224,
        "mixup_alpha": 0.2,
        "mode": "linear",
    }
    assert (plan.precrop, plan.crop, plan.mixup_alpha, plan.mode) == (256, 224, 0.2, "linear")
    assert plan.base_lr == pytest.approx(0.003 * 64 / 512)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"batch_size": 128},
        {"total_steps": 777, "mixup_alpha": 0.0, "resolution_rule": "official"},
        {"base_lr": 0.01, "crop": 100, "precrop": 120, "mode": "linear"},
    ],
)
def test_plan_json_round_trip(kwargs: dict) -> None:
    plan = hyperrule(25_000, (96, 128), arch="BiT-M-R50x1", **kwargs)
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["total_steps"] == plan.total_steps
    assert data["supports"] == list(plan.supports)
    again = Plan.from_dict(data)
    assert again == plan
    assert isinstance(again.supports, tuple) and isinstance(again.image_hw, tuple)
    assert again.lr_at(plan.supports[0]) == plan.lr_at(plan.supports[0])
    assert again.to_dict() == plan.to_dict()
