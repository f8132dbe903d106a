"""Weights kept in (pinned) host memory that visit an accelerator only while they are used."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class HostOffload:
    """Keeps `module`'s parameters and buffers on the host; `on_device()` lends them to `device`.

    Each visit copies the weights host -> device (pinned memory: at PCIe speed, asynchronously) and drops
    the device copies afterwards: nothing is copied back, since inference never changes them.
    """

    def __init__(self, module: nn.Module, device: str | torch.device):
        self.module = module.to("cpu")
        self.device = torch.device(device)
        pin = self.device.type == "cuda" and torch.cuda.is_available()
        self._tensors = [*module.parameters(), *module.buffers()]  # tied weights appear once
        self._host = [t.data.pin_memory() if pin else t.data for t in self._tensors]
        for tensor, host in zip(self._tensors, self._host, strict=True):
            tensor.data = host

    @contextmanager
    def on_device(self) -> Iterator[nn.Module]:
        for tensor, host in zip(self._tensors, self._host, strict=True):
            tensor.data = host.to(self.device, non_blocking=True)
        try:
            yield self.module
        finally:
            for tensor, host in zip(self._tensors, self._host, strict=True):
                tensor.data = host
