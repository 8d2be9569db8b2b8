"""Does the classifier stage learn? Train from the debug recipe on the synthetic shards within a CPU
time budget, then measure held-out test accuracy against baselines measured in the same run:

* chance (1/8) and the majority class of the test split;
* the same network untrained (random init, as the debug recipe starts);
* the trained network with its linear head (what ``d4d.select`` uses).

    python -m benchmarks.classifier_learning [--data data/synthetic] [--budget-min 5]

Builds the synthetic data first when ``--data`` has none. Prints a table and the wall-clock time.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def evaluate(model, image_size: int, shards: str) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(accuracy, per-class accuracy (8,), labels (N,)) of ``model`` on the first frames of ``shards``."""
    from d4d.data.episodes import first_frame_and_label, to_model_input
    from d4d.data.shards import build_clip_pipeline

    images, labels = [], []
    for image, label in build_clip_pipeline(shards, frame_indices=[0], transform=first_frame_and_label):
        if label >= 0:
            images.append(to_model_input(image, image_size))
            labels.append(label)
    x, y = torch.stack(images), torch.tensor(labels)
    with torch.inference_mode():
        pred = torch.cat([model(chunk).argmax(-1) for chunk in x.split(64)])
    per_class = torch.stack([(pred[y == c] == c).float().mean() for c in range(8)])
    return (pred == y).float().mean().item(), per_class, y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/synthetic")
    parser.add_argument("--run-dir", default="runs/bench/classifier_learning")
    parser.add_argument("--budget-min", type=float, default=5.0, help="training time limit (minutes)")
    args = parser.parse_args()
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline"), "WANDB_SILENT": "true"}
    data = Path(args.data)
    if not (data / "test").is_dir():
        subprocess.run([sys.executable, "-m", "data_prep.synthetic", "--out", str(data)], check=True, env=env)

    limit = time.strftime("%H:%M:%S", time.gmtime(args.budget_min * 60))
    recipe_text = (REPO / "recipes/debug/classifier.yaml").read_text().replace("data/synthetic", str(data))
    recipe = Path(args.run_dir) / "recipe.yaml"
    recipe.parent.mkdir(parents=True, exist_ok=True)
    recipe.write_text(recipe_text)
    start = time.time()
    subprocess.run([sys.executable, "-m", "d4d.fit", str(recipe), "--run_dir", args.run_dir,
                    "--trainer.max_time", f"00:{limit}", "--test_after_fit", "false",
                    "--trainer.enable_progress_bar", "false"], check=True, env=env)
    train_seconds = time.time() - start

    from d4d.geometry.motions import MOTIONS
    from d4d.modules.classifier import load_classifier

    trained, meta = load_classifier(Path(args.run_dir) / "checkpoints" / "last.ckpt")
    from d4d.models.motion_classifier import MotionClassifier

    torch.manual_seed(0)
    untrained = MotionClassifier.from_config_dict(meta["resnet_config"], 8, meta["dropout"]).eval()
    test = str(data / "test")
    acc, per_class, labels = evaluate(trained, meta["image_size"], test)
    acc0, _, _ = evaluate(untrained, meta["image_size"], test)
    majority = torch.bincount(labels, minlength=8).max().item() / len(labels)

    print(f"\nheld-out synthetic test clips: {len(labels)}; training wall time {train_seconds:.0f} s "
          f"(budget {args.budget_min:g} min, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs)")
    print(f"{'model':<34s} {'test accuracy':>13s}")
    for name, value in [("chance (1/8)", 1 / 8), ("majority class", majority),
                        ("untrained ResNet-18 (same init)", acc0), ("trained (debug recipe)", acc)]:
        print(f"{name:<34s} {value:>13.1%}")
    print("per class: " + ", ".join(f"{m} {a:.0%}" for m, a in zip(MOTIONS, per_class.tolist())))


if __name__ == "__main__":
    main()
