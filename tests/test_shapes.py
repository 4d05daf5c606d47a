import numpy as np
import pytest
import torch

from train import shapes


@pytest.mark.parametrize("image_size", shapes.IMAGE_SIZES)
def test_analyzer_reads_back_1000_samples(image_size):
    wrong = []
    for i in range(1000):
        split = "train" if i % 4 else "val"
        image, _, truth = shapes.generate(seed=3, split=split, index=i, image_size=image_size)
        found = shapes.analyze(image)
        if found != truth:
            wrong.append((i, truth, found))
    assert not wrong, wrong[:5]


def test_analyzer_is_not_fooled_by_wrong_answers():
    image, _, truth = shapes.generate(0, "train", 5)
    other = shapes.ShapeSample("square" if truth.shape != "square" else "circle", truth.color, truth.size, truth.position)
    assert shapes.analyze(shapes.render(other)) == other != truth
    assert shapes.analyze(np.full((32, 32, 3), 255, dtype=np.uint8)) is None


def test_same_index_same_sample():
    for i in (0, 17, 12345):
        a_img, a_cap, a = shapes.generate(7, "train", i)
        b_img, b_cap, b = shapes.generate(7, "train", i)
        assert a == b and a_cap == b_cap and np.array_equal(np.asarray(a_img), np.asarray(b_img))
    assert any(shapes.generate(7, "train", i)[1] != shapes.generate(8, "train", i)[1] for i in range(20))


def test_vocabulary_and_held_out_split():
    assert len(shapes.SHAPES) >= 4 and len(shapes.COLORS) >= 6 and len(shapes.SIZES) >= 2 and len(shapes.POSITIONS) >= 5
    train_seen = {shapes.generate(0, "train", i)[2] for i in range(3000)}
    val_seen = {shapes.generate(0, "val", i)[2] for i in range(100)}
    assert val_seen == set(shapes.VAL_COMBOS) and not (train_seen & val_seen)
    # ... yet every color+shape pair is trained on, and validation covers all 24 of them
    assert {(s.color, s.shape) for s in train_seen} == {(s.color, s.shape) for s in val_seen}
    assert len({s.label for s in val_seen}) == 24


def test_captions_drop_attributes():
    captions = [shapes.generate(0, "train", i)[1] for i in range(400)]
    assert any(c in ("a red circle", "an orange square", "a blue triangle") for c in captions)
    assert any(" at the " in c and ("small" in c or "large" in c) for c in captions)
    assert shapes.describe(shapes.ShapeSample("circle", "orange", "small", "center"), with_size=False) == "an orange circle in the center"


def test_dataset_items():
    ds = shapes.ShapesDataset("val", size=30, image_size=64)
    item = ds[3]
    assert item["image"].shape == (3, 64, 64) and 0 <= item["image"].min() and item["image"].max() <= 1
    assert item["label"] == shapes.VAL_COMBOS[3].label and item["group"] == 3
    with pytest.raises(ValueError, match="image_size"):
        shapes.ShapesDataset(image_size=48)
