"""Starts saving a file and stalls between writing and renaming it, to be SIGKILLed there.

Usage: python _io_kill_worker.py <path>. Prints ``written`` once the temporary file is
complete (``os.replace`` is replaced by a stall), then sleeps until the test kills it.
"""

from __future__ import annotations

import os
import sys
import time

import torch

from influence.io import save_tensors


def stall(source, target):
    print("written", flush=True)
    time.sleep(300)


if __name__ == "__main__":
    os.replace = stall
    save_tensors(sys.argv[1], {"x": torch.arange(100_000, dtype=torch.float64)}, {"kind": "test"})
    sys.exit("not killed")
