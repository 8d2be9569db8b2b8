"""LightningModule of the few-shot camera-motion classifier (paper "Training details", Table 3).

Loss of one episode (design choice; the paper keeps the 8-way linear head but does not say how the
support set enters): ``CE(linear head, all episode images) + prototype_weight * CE(prototypes)``
where the prototype term classifies each query image by its negative squared Euclidean distance to
the mean pooled feature of each class's support images (prototypical networks). The linear head is
what :mod:`d4d.select` uses at inference; the prototype term shapes the feature space so that the
few support examples per class cluster, which is what makes the head generalise from few shots.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from d4d.geometry.motions import MOTIONS
from d4d.models.motion_classifier import IMAGENET_MEAN, IMAGENET_STD, MotionClassifier
from d4d.utils.checkpoints import read_checkpoint
from d4d.utils.errors import UserError

CHECKPOINT_KEY = "d4d_motion_classifier"


def _adam(params):
    return torch.optim.Adam(params, lr=1e-3)


def _step_lr(optimizer):
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.5)


def prototype_logits(features: torch.Tensor, labels: torch.Tensor, is_query: torch.Tensor):
    """Prototypical-network logits of the query images.

    Args:
        features: ``(N, C)`` pooled features; labels: ``(N,)`` class ids; is_query: ``(N,)`` bool.
    Returns:
        ``(logits (Q, P), targets (Q,))``: negative squared distances of each query whose class has
        support images to the ``P`` class prototypes, and the index of its class among them.
    """
    support = ~is_query
    classes = labels[support].unique()
    protos = torch.stack([features[support & (labels == c)].mean(0) for c in classes])
    query = is_query & torch.isin(labels, classes)
    logits = -torch.cdist(features[query], protos).pow(2)
    targets = torch.searchsorted(classes, labels[query])
    return logits, targets


class MotionClassifierModule(L.LightningModule):
    """Builds :class:`MotionClassifier`, trains it on episodes, reports accuracy per class.

    Args:
        backbone: ``None`` (random init), a transformers directory / hub id (``microsoft/resnet-18``)
            or a torchvision ``.pth`` checkpoint of ImageNet weights.
        num_classes: 8 (Table 3). dropout: 0.5 (Table 3).
        prototype_weight: weight of the prototype loss term (0 disables it).
        resnet_overrides: ``ResNetConfig`` fields replacing the ResNet-18 layout (tiny test models).
        optimizer / scheduler: callables from the recipe (Table 3: Adam 1e-3, StepLR 5 x 0.5).
        plot_dir: where confusion-matrix images are written (default ``<run dir>/plots``).
    """

    def __init__(self, backbone: str | None = None, num_classes: int = 8, dropout: float = 0.5,
                 prototype_weight: float = 1.0, resnet_overrides: dict[str, Any] | None = None,
                 optimizer: OptimizerCallable = _adam, scheduler: LRSchedulerCallable = _step_lr,
                 plot_dir: str | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        if num_classes != len(MOTIONS):
            raise UserError(f"model.num_classes: the classifier predicts the {len(MOTIONS)} motions, got {num_classes}")
        try:
            self.model = MotionClassifier.build(backbone, num_classes, dropout, **(resnet_overrides or {}))
        except (OSError, FileNotFoundError) as exc:
            raise UserError(f"model.backbone: cannot load {backbone!r}: {str(exc).splitlines()[0]}") from None
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.val_metrics = self._metrics()
        self.test_metrics = self._metrics()

    def _metrics(self) -> torch.nn.ModuleDict:
        n = self.hparams.num_classes
        # every rank evaluates the whole validation/test stream (d4d.data.motion_datamodule), so each
        # rank's counts are already the totals: summing them over ranks would multiply the confusion matrix
        local = {"sync_on_compute": False}
        return torch.nn.ModuleDict({
            "acc": MulticlassAccuracy(n, average="micro", **local),
            "per_class": MulticlassAccuracy(n, average="none", **local),
            "confusion": MulticlassConfusionMatrix(n, **local),
        })

    # --------------------------------------------------------------------------------- training
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels, is_query = batch["images"], batch["labels"], batch["is_query"]
        features = self.model.features(images)
        logits = self.model.classify(features)
        ce = F.cross_entropy(logits, labels)
        loss = ce
        if self.hparams.prototype_weight > 0:
            p_logits, p_targets = prototype_logits(features, labels, is_query)
            proto = F.cross_entropy(p_logits, p_targets)
            loss = ce + self.hparams.prototype_weight * proto
            self.log("train/proto_loss", proto)
        query_acc = (logits[is_query].argmax(-1) == labels[is_query]).float().mean()
        self.log_dict({"train/loss": loss, "train/ce_loss": ce, "train/query_acc": query_acc}, prog_bar=True)
        return loss

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.parameters())
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    # ------------------------------------------------------------------------------- evaluation
    def _eval_step(self, batch, metrics) -> None:
        images, labels = batch
        preds = self.model(images).argmax(-1)
        for metric in metrics.values():
            metric.update(preds, labels)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics)

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics)

    def _eval_epoch_end(self, stage: str, metrics) -> None:
        if metrics["acc"].update_count == 0:
            return
        per_class = metrics["per_class"].compute()
        confusion = metrics["confusion"].compute()
        self.log(f"{stage}/acc", metrics["acc"].compute(), prog_bar=True)
        self.log_dict({f"{stage}/acc_{name}": per_class[i] for i, name in enumerate(MOTIONS)})
        for metric in metrics.values():
            metric.reset()
        if not self.trainer.sanity_checking and self.trainer.is_global_zero:
            self._save_confusion(stage, confusion.cpu())

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val", self.val_metrics)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test", self.test_metrics)

    def _save_confusion(self, stage: str, confusion: torch.Tensor) -> None:
        from d4d.utils.plots import confusion_figure

        fig = confusion_figure(confusion, MOTIONS, title=f"{stage} epoch {self.current_epoch}")
        plot_dir = Path(self.hparams.plot_dir or os.path.join(self.trainer.default_root_dir, "plots"))
        plot_dir.mkdir(parents=True, exist_ok=True)
        path = plot_dir / f"{stage}_confusion_epoch{self.current_epoch:03d}.png"
        fig.savefig(path, dpi=100)
        for logger in self.loggers:
            if hasattr(logger, "log_image"):  # wandb
                logger.log_image(key=f"{stage}/confusion", images=[str(path)], step=self.global_step)
        import matplotlib.pyplot as plt

        plt.close(fig)

    # ------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        image_size = getattr(getattr(dm, "hparams", None), "image_size", None) or 224
        checkpoint[CHECKPOINT_KEY] = {
            "resnet_config": self.model.trunk.config.to_dict(),
            "num_classes": self.hparams.num_classes,
            "dropout": self.hparams.dropout,
            "labels": list(MOTIONS),
            "image_size": int(image_size),
            "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD,
        }


def load_classifier(checkpoint_path: str | os.PathLike) -> tuple[MotionClassifier, dict[str, Any]]:
    """Rebuild a trained :class:`MotionClassifier` (eval mode) and its preprocessing settings
    from a Lightning checkpoint written by :class:`MotionClassifierModule`."""
    path = Path(checkpoint_path)
    ckpt = read_checkpoint(path)
    meta = ckpt.get(CHECKPOINT_KEY)
    if meta is None:
        raise UserError(f"{path} is not a motion-classifier checkpoint (no {CHECKPOINT_KEY!r} entry)")
    model = MotionClassifier.from_config_dict(meta["resnet_config"], meta["num_classes"], meta["dropout"])
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(state)
    return model.eval(), meta
