"""The shard pipeline continues where it stopped: a ResumableDataLoader restored from its
state_dict yields exactly the rest of the interrupted epoch (no item repeated or skipped) and then
the same following epochs as an uninterrupted loader."""
from __future__ import annotations

import pytest
import torch

from d4d.data.shards import ResumableDataLoader, build_clip_pipeline
from d4d.utils.errors import UserError


def _key(sample):
    return sample.key


def _collate(keys):
    return list(keys)


def _loader(urls, workers, resampled, epoch_length, batch_size, seed=7):
    dataset = build_clip_pipeline(urls, shuffle=8, resampled=resampled, epoch_length=epoch_length, seed=3,
                                  frame_indices=[0], transform=_key)
    return ResumableDataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=_collate,
                               seed=seed, lookahead=0)


CASES = {  # workers, resampled, epoch_length, batch_size
    "in-process, one pass over the shards": (0, False, None, 4),
    "2 workers, resampled stream": (2, True, 24, 3),
    "3 workers, one shard each": (3, False, None, 4),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_resumed_stream_equals_uninterrupted(case, synthetic_data):
    workers, resampled, epoch_length, batch_size = CASES[case]
    urls = str(synthetic_data / "train")
    ref_loader = _loader(urls, workers, resampled, epoch_length, batch_size)
    reference = [list(ref_loader) for _ in range(2)]
    if not resampled:  # one pass = every clip exactly once, in a shuffled order
        flat = [k for batch in reference[0] for k in batch]
        assert len(flat) == len(set(flat)) == 48
    assert reference[0] != reference[1]  # a new order each epoch

    for stop in (1, 5):
        first = _loader(urls, workers, resampled, epoch_length, batch_size)
        list(first)  # epoch 0 complete
        it = iter(first)
        head = [next(it) for _ in range(stop)]
        state = first.state_dict()
        assert state["epoch"] == 1 and state["batches"] == stop
        del it, first

        resumed = _loader(urls, workers, resampled, epoch_length, batch_size)
        resumed.load_state_dict(state)
        tail = list(resumed)
        assert head + tail == reference[1], f"stopped after {stop} batches"
        assert resumed.state_dict()["batches"] == len(reference[1])


def test_resume_with_other_worker_count_is_refused(synthetic_data):
    loader = _loader(str(synthetic_data / "train"), 0, False, None, 4)
    with pytest.raises(UserError, match="num_workers is 0 but was 2"):
        loader.load_state_dict({"epoch": 0, "batches": 3, "num_workers": 2, "batch_size": 4})


def test_lookahead_counts_only_consumed_batches(synthetic_data):
    dataset = build_clip_pipeline(str(synthetic_data / "train"), frame_indices=[0], transform=_key)
    loader = ResumableDataLoader(dataset, batch_size=4, collate_fn=_collate, lookahead=1)
    it = iter(loader)
    next(it), next(it), next(it)  # a consumer with one batch of lookahead has trained on 2
    assert loader.state_dict()["batches"] == 2
    rest = list(it)
    assert len(rest) == 9 and loader.state_dict()["batches"] == 12  # exhausted: all consumed
    assert torch.initial_seed() is not None
