"""Small float64 models and data shared by the tests (tiny, deterministic)."""

from __future__ import annotations

import torch
from torch import nn

from influence.lm import TinyLM, TinyLMConfig

DT = torch.float64


def mlp(d_in=4, hidden=(6,), d_out=3, seed=0, activation=nn.Tanh) -> nn.Module:
    torch.manual_seed(seed)
    layers, prev = [], d_in
    for h in hidden:
        layers += [nn.Linear(prev, h), activation()]
        prev = h
    layers.append(nn.Linear(prev, d_out))
    return nn.Sequential(*layers).to(DT).eval()


class SmallCNN(nn.Module):
    """Conv2d → BatchNorm (eval) → ReLU → MaxPool → Conv2d (no bias) → mean pool → Linear."""

    def __init__(self, channels=3, classes=3):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 5, 3, stride=1, bias=False)
        self.fc = nn.Linear(5, classes)

    def forward(self, x):
        x = self.pool(torch.relu(self.bn(self.conv1(x))))
        x = torch.relu(self.conv2(x)).mean(dim=(2, 3))
        return self.fc(x)


def cnn(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    model = SmallCNN().to(DT)
    with torch.no_grad():  # non-trivial running statistics
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 1.5)
    return model.eval()


def tiny_lm(seed=0, vocab=13, d_model=8, n_layers=2, n_heads=2, d_ff=12, max_len=12) -> nn.Module:
    torch.manual_seed(seed)
    config = TinyLMConfig(vocab_size=vocab, d_model=d_model, n_layers=n_layers, n_heads=n_heads, d_ff=d_ff, max_len=max_len)
    return TinyLM(config).to(DT).eval()


def frozen_mlp(seed=0) -> nn.Module:
    """An MLP whose first layer is frozen (requires_grad=False)."""
    model = mlp(seed=seed, hidden=(5,))
    for p in model[0].parameters():
        p.requires_grad_(False)
    return model


def classification_data(n=12, d_in=4, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=DT)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


def image_data(n=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g, dtype=DT), torch.randint(0, classes, (n,), generator=g)


def lm_batch(n=4, T=8, vocab=13, seed=0, lengths=None, labels=False):
    """A right-padded LM batch with variable lengths (pad id 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, T), generator=g)
    lengths = lengths or [T - (i % 4) for i in range(n)]
    mask = torch.zeros(n, T, dtype=torch.long)
    for i, L in enumerate(lengths):
        mask[i, :L] = 1
    ids = ids.masked_fill(mask == 0, 0)
    batch = {"input_ids": ids, "attention_mask": mask}
    if labels:  # a prompt/response split: the first two tokens are prompt (-100)
        lab = ids.masked_fill(mask == 0, -100).clone()
        lab[:, :2] = -100
        batch["labels"] = lab
    return batch


def batches(x, y, batch_size):
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]


def dict_batches(batch: dict, batch_size: int):
    n = batch["input_ids"].shape[0]
    return [{k: v[i : i + batch_size] for k, v in batch.items()} for i in range(0, n, batch_size)]
