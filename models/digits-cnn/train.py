"""Train the digits-cnn model on scikit-learn's bundled 8x8 digits and export TorchScript.

Writes (next to this script, or --out DIR):
  model.pt      traced module: forward(pixels: f32[B,64] raw 0..16) -> f32[B,10] probabilities
  heldout.json  the first 200 held-out samples with label and the traced model's prediction

Deterministic (fixed seeds, single thread) so the committed artifact can be rebuilt.
Exits 1 if held-out accuracy is below 95%.
"""

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

SEED = 7
MIN_ACCURACY = 0.95
EPOCHS = 30


class DigitsCNN(nn.Module):
    """~38k parameters: two 3x3 convolutions, one 2x2 pool, two linear layers."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
        )

    def forward(self, pixels):  # pixels: [B, 64] raw values 0..16
        x = (pixels / 16.0).view(-1, 1, 8, 8)
        return self.classifier(self.features(x))


class Served(nn.Module):
    """What the worker runs: raw pixels in, probabilities out (scaling inside the model)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixels):
        return torch.softmax(self.model(pixels), dim=1)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    # scripts/setup passes --if-missing: the artifact is committed, so setup must not churn it.
    parser.add_argument("--if-missing", action="store_true", help="do nothing when model.pt and heldout.json exist")
    args = parser.parse_args()
    model_path, heldout_path = args.out / "model.pt", args.out / "heldout.json"
    if args.if_missing and model_path.exists() and heldout_path.exists():
        print(f"digits-cnn: {model_path} present (committed); not retraining")
        return 0

    started = time.time()
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    torch.set_num_threads(1)  # bit-for-bit repeatable training on CPU
    torch.use_deterministic_algorithms(True)

    digits = load_digits()
    x = digits.data.astype(np.float32)  # [1797, 64], values 0..16
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, stratify=y, random_state=SEED)
    x_train, y_train = torch.from_numpy(x_train), torch.from_numpy(y_train)
    x_test, y_test = torch.from_numpy(x_test), torch.from_numpy(y_test)
    print(f"digits-cnn: training on {len(y_train)} images, {EPOCHS} epochs (seed {SEED}, CPU)", flush=True)

    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(SEED)
    for _ in range(EPOCHS):
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        for start in range(0, len(order), 32):
            batch = order[start:start + 32]
            optimizer.zero_grad()
            loss_fn(model(x_train[batch]), y_train[batch]).backward()
            optimizer.step()

    model.eval()
    served = Served(model).eval()
    with torch.no_grad():
        eager = served(x_test).argmax(dim=1)
        # Batch size is traced symbolically (view(-1, ...)), so any B works afterwards.
        traced = torch.jit.trace(served, x_test[:4])
    args.out.mkdir(parents=True, exist_ok=True)
    traced.save(str(model_path))

    reloaded = torch.jit.load(str(model_path))
    with torch.no_grad():
        predicted = reloaded(x_test).argmax(dim=1)
    if not torch.equal(predicted, eager):
        print("digits-cnn: traced model disagrees with eager model", file=sys.stderr)
        return 1
    accuracy = (predicted == y_test).float().mean().item()
    parameters = sum(p.numel() for p in model.parameters())
    print(f"digits-cnn: held-out accuracy {accuracy:.4f} ({len(y_test)} samples), {parameters} parameters, "
          f"{model_path.stat().st_size // 1024} KB, {time.time() - started:.1f} s")

    samples = [
        {"pixels": [int(v) for v in x_test[i].tolist()], "label": int(y_test[i]), "predicted": int(predicted[i])}
        for i in range(min(200, len(y_test)))
    ]
    heldout_path.write_text(json.dumps({"accuracy": accuracy, "samples": samples}) + "\n")
    if accuracy < MIN_ACCURACY:
        print(f"digits-cnn: accuracy below {MIN_ACCURACY}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
