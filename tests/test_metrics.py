"""Official and standard mIoU (spec §7, checklist #18)."""
import numpy as np
import pytest
import torch

from bench.errors import BenchError
from bench.metrics import ConfusionMatrix, miou, per_class_iou

TOL = 1e-6  # the official 1e-8 term shifts values slightly (spec §7.3)


def test_worked_example_1_ignore_inside_class_range():
    # K = 3, ignore = 0 (Bedroom-style): the gt=0 pixel predicted as 1 widens class 1's union.
    gt, pred = [np.array([0, 1, 1, 2])], [np.array([1, 1, 2, 2])]
    kw = dict(num_classes=3, ignore_label=0)
    np.testing.assert_allclose(per_class_iou(pred, gt, **kw), [1 / 3, 1 / 2], atol=TOL)
    assert miou(pred, gt, **kw) == pytest.approx(0.416667, abs=TOL)
    np.testing.assert_allclose(per_class_iou(pred, gt, variant="standard", **kw), [1 / 2, 1 / 2], atol=TOL)
    assert miou(pred, gt, variant="standard", **kw) == pytest.approx(0.5, abs=TOL)


def test_worked_example_2_ignore_255_and_absent_class():
    gt, pred = [np.array([0, 0, 1, 255])], [np.array([0, 0, 1, 1])]
    kw = dict(num_classes=3, ignore_label=255)
    np.testing.assert_allclose(per_class_iou(pred, gt, **kw), [1, 1 / 2, 0], atol=TOL)
    assert miou(pred, gt, **kw) == pytest.approx(0.5, abs=TOL)  # absent class 2 counts as 0
    standard = per_class_iou(pred, gt, variant="standard", **kw)
    np.testing.assert_allclose(standard[:2], [1, 1], atol=TOL)
    assert np.isnan(standard[2])  # excluded, not 0
    assert miou(pred, gt, variant="standard", **kw) == pytest.approx(1.0, abs=TOL)


def test_standard_counts_a_predicted_class_absent_from_gt_as_zero():
    gt, pred = [np.array([0, 0, 0, 0])], [np.array([0, 0, 1, 1])]
    standard = per_class_iou(pred, gt, num_classes=3, ignore_label=255, variant="standard")
    np.testing.assert_allclose(standard[:2], [0.5, 0.0])
    assert np.isnan(standard[2])


def test_dataset_level_accumulation_not_per_image_average():
    gts = [np.array([0, 0, 0, 1]), np.array([1, 1, 1, 1])]
    preds = [np.array([0, 0, 0, 0]), np.array([1, 1, 1, 1])]
    kw = dict(num_classes=2, ignore_label=255)
    per_image = np.mean([miou([p], [g], **kw) for p, g in zip(preds, gts)])  # (0.375 + 0.5) / 2
    pooled = miou(preds, gts, **kw)  # IoU0 = 3/4, IoU1 = 4/5
    assert per_image == pytest.approx(0.4375, abs=TOL)
    assert pooled == pytest.approx((0.75 + 0.8) / 2, abs=TOL)


def test_bedroom_default_classes_skip_ignore_id_and_custom_order():
    cm = ConfusionMatrix(num_classes=29, ignore_label=0)
    cm.update(np.array([[5, 5], [7, 7]]), np.array([[5, 0], [7, 7]]))
    assert cm.iou().shape == (28,)  # ids 1..28
    np.testing.assert_allclose(cm.iou(class_ids=[7, 5]), [1.0, 0.5], atol=TOL)
    np.testing.assert_allclose(cm.iou("standard", class_ids=[7, 5]), [1.0, 1.0])


def test_streaming_equals_one_shot_and_accepts_torch_and_uint8():
    rng = np.random.default_rng(0)
    gts = [rng.choice([0, 1, 2, 3, 255], size=(8, 8)).astype(np.uint8) for _ in range(5)]
    preds = [rng.integers(0, 4, size=(8, 8)) for _ in range(5)]
    streamed = ConfusionMatrix(4, 255)
    for p, g in zip(preds, gts):
        streamed.update(torch.from_numpy(p), torch.from_numpy(g))
    one_shot = ConfusionMatrix(4, 255)
    one_shot.update(np.concatenate(preds), np.concatenate(gts))
    np.testing.assert_array_equal(streamed.counts, one_shot.counts)
    assert streamed.counts.sum() == 5 * 64  # every pixel counted once, 255 not wrapped in uint8
    for variant in ("official", "standard"):
        assert streamed.miou(variant) == one_shot.miou(variant)
        assert miou(preds, gts, num_classes=4, ignore_label=255, variant=variant) == one_shot.miou(variant)


def test_errors_name_the_bad_value():
    cm = ConfusionMatrix(3, 255)
    with pytest.raises(ValueError, match="'strict'"):
        cm.miou("strict")
    with pytest.raises(ValueError, match="'strict'"):
        miou([np.zeros(2, int)], [np.zeros(2, int)], num_classes=3, ignore_label=255, variant="strict")
    with pytest.raises(BenchError, match=r"\(2, 2\).*\(4,\)"):
        cm.update(np.zeros((2, 2), int), np.zeros(4, int))
    with pytest.raises(BenchError, match="pred holds class id 3"):
        cm.update(np.array([3]), np.array([0]))
    with pytest.raises(BenchError, match="gt holds class id 7"):
        cm.update(np.array([0]), np.array([7]))
    with pytest.raises(BenchError, match="float"):
        cm.update(np.array([0.0]), np.array([0]))
    with pytest.raises(BenchError, match="class_ids holds 0"):
        ConfusionMatrix(3, 0).iou(class_ids=[0, 1])
    with pytest.raises(BenchError, match="2 predictions for 1"):
        miou([np.zeros(2, int)] * 2, [np.zeros(2, int)], num_classes=3, ignore_label=255)
    assert cm.counts.sum() == 0  # rejected updates left nothing behind
