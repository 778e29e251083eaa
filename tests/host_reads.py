"""Find, on a CPU, the operations that would read a device tensor back to the host on a GPU.

On a CPU every tensor is a host tensor, so a synchronisation cannot be observed; it can be predicted.
:class:`HostReads` is a ``TorchFunctionMode`` that follows which tensors would live on the model's
device ("device" tensors: the model call's inputs, everything computed from them or written with
them in place, and whatever ``prune``'s ``to_device`` returns) and, while inside a
window (prune's own code between the encoder and the language model), records every operation
that on a GPU would copy such a tensor to the host or wait for it: ``item``, ``tolist``, ``bool()``,
``int()``, ``cpu()``, ``nonzero`` (but not ``nonzero_static``), ``unique``, ``bincount``,
``masked_select``, boolean-mask indexing, ``repeat_interleave`` without ``output_size``, and
``.to("cpu")`` (a string names the host; a ``torch.device`` object, as in ``x.to(embeds.device)``,
the model's device, which is "cpu" too on this machine).
"""

from __future__ import annotations

import contextlib
import functools
import traceback
import weakref

import torch
from torch.overrides import TorchFunctionMode

READS = {"item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero", "argwhere",
         "unique", "unique_consecutive", "bincount", "masked_select", "cpu"}
HOST_RESULTS = {"item", "tolist", "numpy", "cpu", "pin_memory", "__bool__", "__int__", "__float__", "__index__"}


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


class HostReads(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self._device: dict[int, weakref.ref] = {}
        self.inside = 0
        self.reads: list[str] = []

    # ---- which tensors are on the device ---------------------------------------------------------
    def mark(self, value) -> None:
        for t in _tensors(value):
            self._device[id(t)] = weakref.ref(t)

    def unmark(self, t: torch.Tensor) -> None:
        self._device.pop(id(t), None)

    def on_device(self, t: torch.Tensor) -> bool:
        ref = self._device.get(id(t))
        return ref is not None and ref() is t

    @contextlib.contextmanager
    def window(self, inside: bool = True):
        """Inside (or, ``inside=False``, outside) the window for the block's duration."""
        saved = self.inside
        self.inside = saved + 1 if inside else 0
        try:
            yield
        finally:
            self.inside = saved

    def windowed(self, fn, inside: bool = True):
        """``fn`` run inside (or outside) the window."""
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            with self.window(inside):
                return fn(*args, **kwargs)

        return inner

    # ---- the mode ----------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        inputs = list(_tensors(args)) + list(_tensors(kwargs))
        device_in = any(self.on_device(t) for t in inputs)
        if self.inside and device_in and self._is_read(name, args, kwargs):
            where = "".join(traceback.format_stack(limit=6)[:-1])
            self.reads.append(f"{name}\n{where}")
        out = func(*args, **kwargs)
        if name in HOST_RESULTS or (name == "to" and self._to_host(args, kwargs)):
            for t in _tensors(out):
                if not any(t is i for i in inputs):
                    self.unmark(t)
            return out
        if device_in:
            self.mark(out)
            if device_in and args and isinstance(args[0], torch.Tensor) and (
                name == "__setitem__" or (name.endswith("_") and not name.startswith("__"))
            ):
                self.mark(args[0])  # written in place with device data
        return out

    def reads_in(self, path: str) -> list[str]:
        """The reads made by code in files whose path holds ``path`` (the innermost frame)."""
        return [r for r in self.reads if path in r.rsplit('File "', 1)[-1].split('"', 1)[0].replace("\\", "/")]

    @staticmethod
    def _to_host(args, kwargs) -> bool:
        # On a CPU the model's device is "cpu" too: a torch.device object (``x.to(embeds.device)``)
        # stands for the model's device, the string "cpu" (``x.to("cpu")``) for the host.
        target = kwargs.get("device", args[1] if len(args) > 1 else None)
        return isinstance(target, str) and torch.device(target).type == "cpu"

    def _is_read(self, name, args, kwargs) -> bool:
        if name in READS:
            return True
        if name == "to":
            return self._to_host(args, kwargs)
        if name in ("__getitem__", "__setitem__") and len(args) > 1:
            return any(t.dtype == torch.bool for t in _tensors(args[1]))
        if name == "repeat_interleave":
            repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
            return isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None
        return False


@contextlib.contextmanager
def watch(monkeypatch, model_inputs: dict) -> HostReads:
    """A :class:`HostReads` whose window is prune's code from the encoder's statistics to the
    language model's input (the attention tap and the language model's pre-hook). Install before
    ``prune.wrap`` (the hooks bind the patched methods)."""
    from prune.hooks import base, qwen2_vl
    from prune.methods import base as methods_base

    mode = HostReads()
    windowed = mode.windowed
    monkeypatch.setattr(base.Adapter, "_on_language_model_call", windowed(base.Adapter._on_language_model_call))
    monkeypatch.setattr(base.Adapter, "_collect", windowed(base.Adapter._collect))
    # the statistics kernel's CPU reference checks its indices on the host; on a GPU its Triton path
    # runs instead (no sync: tests/test_gpu_sync.py checks it there)
    monkeypatch.setattr(base, "attention_stats", windowed(base.attention_stats, inside=False))
    original = methods_base.to_device

    def to_device(host, device):
        out = original(host, device).clone()  # a device tensor on the GPU
        mode.mark(out)
        return out

    for module in (base, methods_base, qwen2_vl):
        monkeypatch.setattr(module, "to_device", to_device)
    mode.mark(list(model_inputs.values()))
    with mode:
        yield mode


@contextlib.contextmanager
def watch_forward(monkeypatch, model_inputs: dict) -> HostReads:
    """:func:`watch`, whose window the test opens over a whole forward (``with mode.window():``),
    the model's own code included, except prune's two host copies made before the encoder is queued
    (the prompt in the multimodal forward's pre-hook, the shape arguments of the feature function)."""
    from prune.hooks import base

    with watch(monkeypatch, model_inputs) as mode:
        for owner, name in ((base.Adapter, "_on_multimodal_call"), (base, "host_shape_arguments")):
            monkeypatch.setattr(owner, name, mode.windowed(getattr(owner, name), inside=False))
        yield mode

