"""Shared helpers of the benchmarks: models, timing side by side, JSON + markdown output."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from influence.lm import TinyLM, TinyLMConfig

RESULTS = Path(__file__).resolve().parent / "results"


def mlp(d_in=784, hidden=512, depth=2, classes=10):
    layers, prev = [], d_in
    for _ in range(depth):
        layers += [nn.Linear(prev, hidden), nn.ReLU()]
        prev = hidden
    return nn.Sequential(*layers, nn.Linear(prev, classes))


class CNN(nn.Module):
    def __init__(self, c1=32, c2=64, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.fc = nn.Linear(c2, classes)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc(x.mean(dim=(2, 3)))


def lm(vocab=2048, d_model=256, n_layers=4, n_heads=4, d_ff=1024, max_len=64):
    return TinyLM(TinyLMConfig(vocab_size=vocab, d_model=d_model, n_layers=n_layers, n_heads=n_heads, d_ff=d_ff, max_len=max_len))


def lm_batch(n, T, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, T), generator=g)
    lengths = torch.randint(T // 2, T + 1, (n,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


def to(batch, device):
    """A batch (tuple/list of tensors or dict of tensors), or a list of batches, on ``device``."""
    if isinstance(batch, dict):
        return {k: v.to(device) for k, v in batch.items()}
    if isinstance(batch, list):
        return [to(b, device) for b in batch]
    if isinstance(batch, tuple):
        return tuple(t.to(device) for t in batch)
    return batch.to(device)


def sync(device=None) -> None:
    """Waits for queued CUDA work on ``device`` (a device, its name, or a tensor on it; default:
    any CUDA device present), so that a timer read after it counts that work."""
    if isinstance(device, torch.Tensor):
        device = device.device
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


def synced(fn):
    """``fn`` followed by :func:`sync`."""

    def run():
        out = fn()
        sync()
        return out

    return run


def side_by_side(fns: dict, repeats: int, warmup: int = 1) -> dict:
    """Runs the functions round-robin (so machine noise hits all alike); median seconds each."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def environment() -> dict:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


def write(name: str, payload: dict, table: list[dict], out_dir: Path, notes: str = "") -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str))
    if table:
        cols = list(table[0])
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for row in table:
            lines.append("| " + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
        env = payload.get("environment", {})
        head = f"# {name}\n\n{env}\n\n"
        (out_dir / f"{name}.md").write_text(head + "\n".join(lines) + "\n\n" + notes + "\n")


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


class BasicBlock(nn.Module):
    """torchvision's ResNet ``BasicBlock``: two 3×3 convolutions (no bias) with BatchNorm, and a
    1×1 strided projection on the shortcut when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet18(nn.Module):
    """torchvision's ``resnet18`` layout (ImageNet stem: 7×7 stride-2 conv, 3×3 stride-2 max
    pool; four stages of two BasicBlocks) with configurable widths (default 64-512). At 32×32
    inputs the stages run at 8, 4, 2 and 1 pixels, so the last stage's 3×3 convolutions see
    1×1 maps: their K-FAC input factors are zero outside the centre taps (issue 16)."""

    def __init__(self, widths=(64, 128, 256, 512), classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages, c_in = [], widths[0]
        for i, width in enumerate(widths):
            stages.append(nn.Sequential(BasicBlock(c_in, width, 1 if i == 0 else 2), BasicBlock(width, width, 1)))
            c_in = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(c_in, classes)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.mean(dim=(2, 3)))


def result_name(name: str, smoke: bool, device: str = "cpu") -> str:
    """``name``, ``name_smoke`` for smoke runs, ``_<device>`` appended off the CPU."""
    return name + ("_smoke" if smoke else "") + ("" if device == "cpu" else "_" + device)


def smoke_cli(run, device: bool = False) -> None:
    """The command line of a benchmark ``run(smoke, out_dir[, device])``: ``--smoke``, ``--out``
    and, with ``device=True``, ``--device``."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    if device:
        ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    run(args.smoke, args.out, *([args.device] if device else []))
