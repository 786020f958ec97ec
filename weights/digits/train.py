"""Train the digits network and write model.safetensors and accuracy.json.

    .venv/bin/python weights/digits/train.py

Deterministic: the same seed, split and schedule give the same weights.
Data: scikit-learn's bundled 8x8 digits (1,797 images; nothing downloaded).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from model import DigitsNet  # noqa: E402

SEED = 0


def main() -> None:
    torch.manual_seed(SEED)
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data, digits.target, test_size=0.25, random_state=SEED, stratify=digits.target
    )
    xs = torch.tensor(x_train, dtype=torch.float32)
    ys = torch.tensor(y_train, dtype=torch.long)
    net = DigitsNet()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-4)
    for _ in range(300):
        for batch in torch.randperm(len(xs)).split(64):
            logits = net.layers(xs[batch] / 16.0)
            loss = torch.nn.functional.cross_entropy(logits, ys[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    net.eval()
    with torch.inference_mode():
        predicted = net(torch.tensor(x_test, dtype=torch.float32))["label"]
    accuracy = float((predicted == torch.tensor(y_test)).float().mean())
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, HERE / "model.safetensors")
    report = {
        "held_out_accuracy": round(accuracy, 4),
        "train_items": len(x_train),
        "test_items": len(x_test),
        "seed": SEED,
        "epochs": 300,
        "torch": torch.__version__,
    }
    (HERE / "accuracy.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
