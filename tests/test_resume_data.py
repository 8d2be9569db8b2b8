"""The shard pipeline continues where it stopped: a ResumableDataLoader restored from its
state_dict yields exactly the rest of the interrupted epoch (no item repeated or skipped) and then
the same following epochs as an uninterrupted loader."""
from __future__ import annotations

import pytest
import torch
from lightning.pytorch import LightningModule

from d4d.data.resumable import ResumableDataLoader
from d4d.data.shards import build_clip_pipeline
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


# ------------------------------------------------- the video and 4D DataModules' training loaders
def _datamodule(kind, root, workers):
    from d4d.data.clip_datamodule import ClipDataModule
    from d4d.data.fourd_datamodule import FourDDataModule

    if kind == "clip":
        dm = ClipDataModule(str(root / "train"), num_frames=3, image_size=(16, 16), batch_size=3,
                            num_workers=workers, shuffle=8, epoch_length=12, seed=5)
    else:
        dm = FourDDataModule(str(root / "train"), num_frames=3, image_sizes=[(16, 16), (12, 16)], batch_size=3,
                             num_workers=workers, shuffle=8, epoch_length=12, seed=5)
    dm.setup("fit")
    return dm


def _epoch(batches):
    return [(tuple(b["key"]), tuple(b["frames"].shape)) for b in batches]


@pytest.mark.parametrize("kind", ["clip", "fourd"])
@pytest.mark.parametrize("workers", [0, 2])
def test_stage_datamodules_resume_mid_epoch(kind, workers, synthetic_data):
    ref = _datamodule(kind, synthetic_data, workers).train_dataloader()
    reference = [_epoch(ref) for _ in range(2)]
    assert reference[0] != reference[1]  # a new stream each epoch, not the same one again
    assert len(reference[1]) == 4

    first = _datamodule(kind, synthetic_data, workers).train_dataloader()
    _epoch(first)
    it = iter(first)
    head = _epoch([next(it) for _ in range(2)])
    first.note_consumed(2)  # what Lightning's ResumeState callback reports after each trained batch
    state = first.state_dict()
    del it, first

    resumed = _datamodule(kind, synthetic_data, workers).train_dataloader()
    resumed.load_state_dict(state)
    assert head + _epoch(resumed) == reference[1]


class _Numbers(torch.utils.data.IterableDataset):
    def __len__(self):
        return 8

    def __iter__(self):
        return iter(torch.arange(8, dtype=torch.float32).view(8, 1))


class _Tiny(LightningModule):
    def __init__(self, early: bool = False):
        super().__init__()
        self.early, self.layer = early, torch.nn.Linear(1, 1)

    def train_dataloader(self):
        return ResumableDataLoader(_Numbers(), batch_size=2, seed=0)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).pow(2).mean()

    def configure_optimizers(self):
        if self.early:  # builds (and iterates) the training loader before a checkpoint is restored
            assert self.trainer.estimated_stepping_batches > 0
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(tmp_path, *callbacks):
    from lightning.pytorch import Trainer

    from d4d.callbacks import ResumeState
    # max_epochs, not max_steps: estimated_stepping_batches then needs the loader's length (builds it)
    return Trainer(max_epochs=1, callbacks=[ResumeState(), *callbacks], logger=False, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=tmp_path)


@pytest.mark.parametrize("early", [False, True], ids=["restored", "loader-built-early"])
def test_resume_refuses_an_unrestored_loader_position(early, tmp_path):
    """A checkpoint taken mid-epoch 0 records epoch 0 (not -1); resuming restores the position, and a
    module that iterates the loader before the restore (Lightning #20550) is refused, not silent."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    _trainer(tmp_path, ModelCheckpoint(tmp_path, "{step}", every_n_train_steps=3, save_top_k=-1)).fit(_Tiny())
    ckpt = tmp_path / "step=3.ckpt"
    state = torch.load(ckpt, weights_only=False)["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert (state["epoch"], state["batches"]) == (0, 3)
    resumed = _trainer(tmp_path)
    if early:
        with pytest.raises(UserError, match="data-loader position was not restored.*#20550"):
            resumed.fit(_Tiny(early=True), ckpt_path=ckpt)
    else:
        resumed.fit(_Tiny(), ckpt_path=ckpt)
        assert resumed.train_dataloader.restored["batches"] == 3 and resumed.global_step == 4
