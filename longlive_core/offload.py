"""Weights kept in (pinned) host memory that visit an accelerator only while they are used."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn


class HostOffload:
    """Keeps `module`'s parameters and buffers on the host; `on_device()` lends them to `device`.

    Each visit copies the weights host -> device (pinned memory: at PCIe speed, asynchronously) and drops
    the device copies afterwards: nothing is copied back, since inference never changes them.

    parts: submodules lent one at a time, each only during its own forward (in the order the forward
    runs them: a T5 encoder's embedding, then its blocks), so the device holds the largest part's weights
    and not all of them; what no part holds is lent for the whole visit. The same bytes cross PCIe.
    """

    def __init__(self, module: nn.Module, device: str | torch.device, parts: Sequence[nn.Module] = ()):
        self.module = module.to("cpu")
        self.device = torch.device(device)
        pin = self.device.type == "cuda" and torch.cuda.is_available()
        self._host: dict[torch.Tensor, torch.Tensor] = {}  # tensor -> its host data (tied weights once)
        for tensor in [*module.parameters(), *module.buffers()]:
            self._host[tensor] = tensor.data.pin_memory() if pin else tensor.data
            tensor.data = self._host[tensor]
        self._parts = [[t for t in [*p.parameters(), *p.buffers()] if t in self._host] for p in parts]
        in_parts = {t for tensors in self._parts for t in tensors}
        self._whole = [t for t in self._host if t not in in_parts]
        self.lent_parts: set[int] = set()  # parts on the device now
        for index, part in enumerate(parts):
            part.register_forward_pre_hook(lambda *_, i=index: self._lend(i))
            part.register_forward_hook(lambda *_, i=index: self._take_back(i))
        self._visiting = False

    @contextmanager
    def on_device(self) -> Iterator[nn.Module]:
        self._visiting = True
        self._move(self._whole, to_device=True)
        try:
            yield self.module
        finally:
            self._visiting = False
            self._move(self._whole, to_device=False)
            for index in list(self.lent_parts):
                self._take_back(index)

    def _lend(self, index: int) -> None:
        if self._visiting:
            self._move(self._parts[index], to_device=True)
            self.lent_parts.add(index)

    def _take_back(self, index: int) -> None:
        if index in self.lent_parts:
            self._move(self._parts[index], to_device=False)
            self.lent_parts.discard(index)

    def _move(self, tensors: list[torch.Tensor], to_device: bool) -> None:
        for tensor in tensors:
            host = self._host[tensor]
            tensor.data = host.to(self.device, non_blocking=True) if to_device else host
