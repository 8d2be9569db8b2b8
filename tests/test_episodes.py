"""Episodic few-shot sampling and the prototype loss of the classifier stage."""
import itertools

import torch

from d4d.data.episodes import FLIP_LABEL, EpisodeStream, to_model_input
from d4d.geometry.motions import MOTIONS
from d4d.modules.classifier import prototype_logits


def _labelled_images(n_per_class=250, size=8, unlabelled_every=5):
    """An endless stream: image of class c has value 10*c+1 in its left half (right half 0) and a
    per-item id in pixel (0, 0) so that repeats can be detected."""
    def source():
        for i in itertools.count():
            c = i % len(MOTIONS)
            img = torch.zeros(size, size, 3, dtype=torch.uint8)
            img[:, : size // 2] = 10 * c + 1
            img[0, 0, 0] = (i // len(MOTIONS)) % n_per_class
            yield img, (-1 if i % unlabelled_every == unlabelled_every - 1 else c)
    return source


def _raw_left_value(x):
    """Undo ImageNet normalisation of the red channel and return the mean of the left column."""
    red = x[:, 0] * 0.229 + 0.485
    return (red[:, 1:, 0].mean(-1) * 255).round()


def test_episode_shape_balance_and_order():
    stream = EpisodeStream(_labelled_images(), image_size=8, episodes=3, flip=False, brightness=0, seed=1)
    episodes = list(stream)
    assert len(episodes) == 3 == len(stream)
    for ep in episodes:
        assert ep["images"].shape == (8 * 9, 3, 8, 8)
        labels, is_query = ep["labels"], ep["is_query"]
        assert torch.equal(torch.bincount(labels, minlength=8), torch.full((8,), 9))
        for c in range(8):  # class-major, 5 support then 4 query
            assert is_query[labels == c].tolist() == [False] * 5 + [True] * 4
        # the image content agrees with its label: left half holds 10*c+1
        assert torch.equal(_raw_left_value(ep["images"]), (10 * labels + 1).float())


def test_episode_items_distinct_within_class():
    ep = next(iter(EpisodeStream(_labelled_images(), image_size=8, episodes=1, flip=False, brightness=0)))
    ids = (ep["images"][:, 0, 0, 0] * 0.229 + 0.485) * 255
    for c in range(8):
        class_ids = ids[ep["labels"] == c].round().tolist()
        assert len(set(class_ids)) == 9  # drawn without replacement from the class pool


def test_flip_swaps_turn_labels_and_mirrors_image():
    ep = next(iter(EpisodeStream(_labelled_images(), image_size=8, episodes=1, flip=True, brightness=0, seed=3)))
    red = ep["images"][:, 0] * 0.229 + 0.485
    left, right = red[:, 1:, 0].mean(-1), red[:, 1:, -1].mean(-1)
    flipped = right > left
    assert 0 < flipped.sum() < len(flipped)
    values = ((torch.where(flipped, right, left)) * 255).round()
    original_class = ((values - 1) / 10).long()
    expected = torch.tensor([FLIP_LABEL.get(int(c), int(c)) if f else int(c)
                             for c, f in zip(original_class, flipped)])
    assert torch.equal(ep["labels"], expected)


def test_n_way_subset_and_determinism():
    a = list(EpisodeStream(_labelled_images(), image_size=8, n_way=3, k_shot=2, n_query=1, episodes=4, seed=5))
    b = list(EpisodeStream(_labelled_images(), image_size=8, n_way=3, k_shot=2, n_query=1, episodes=4, seed=5))
    for x, y in zip(a, b):
        assert torch.equal(x["images"], y["images"]) and torch.equal(x["labels"], y["labels"])
        assert x["images"].shape[0] == 9 and len(x["labels"].unique()) <= 4  # flips may swap a turn class
    classes = {tuple(sorted(set(e["labels"].tolist()))) for e in a}
    assert len(classes) > 1  # classes are re-drawn per episode


def test_to_model_input_normalises():
    white = torch.full((4, 6, 3), 255, dtype=torch.uint8)
    x = to_model_input(white, 8)
    assert x.shape == (3, 8, 8)
    torch.testing.assert_close(x[:, 0, 0], (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225]))


def test_prototype_logits_hand_case():
    features = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [1.0, 0.0], [0.0, 3.0]])
    labels = torch.tensor([5, 5, 2, 5, 2])
    is_query = torch.tensor([False, False, False, True, True])
    logits, targets = prototype_logits(features, labels, is_query)
    # prototypes: class 2 -> (0, 4), class 5 -> (1, 0) (sorted class order 2, 5)
    expected = -torch.tensor([[1.0 + 16.0, 0.0], [1.0, 1.0 + 9.0]])
    torch.testing.assert_close(logits, expected)
    assert targets.tolist() == [1, 0]
