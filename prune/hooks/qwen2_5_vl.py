"""Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration): Qwen2-VL's layout plus window attention.

Most vision blocks attend inside windows; blocks ``fullatt_block_indexes`` (7, 15, 23, 31 on the 7B)
attend over each image / temporal slice. The encoder permutes merge units window by window, so the
statistics of a block come out in that order and are put back in raster order with the inverse of
the model's own window index. Window segments (cu_seqlens) are respected by the statistics.
"""

from __future__ import annotations

import functools

import torch

from .qwen2_vl import Qwen2VLAdapter


def _window_index(visual, grid_thw: torch.Tensor) -> torch.Tensor:
    try:  # transformers >= 5.1x: a function of vision_utils
        from transformers.vision_utils import get_vision_window_index

        index, _ = get_vision_window_index(
            grid_thw,
            spatial_merge_size=visual.spatial_merge_size,
            window_size=visual.window_size,
            patch_size=visual.patch_size,
            kwargs={},
        )
    except ImportError:  # older releases: a method of the vision model
        index, _ = visual.get_window_index(grid_thw)
    return torch.as_tensor(index).long()


_MAX_ORDERS = 64


class Qwen25VLAdapter(Qwen2VLAdapter):
    family = "qwen2_5_vl"
    model_classes = ("Qwen2_5_VLForConditionalGeneration",)

    def unit_order(self, grid_thw: torch.Tensor) -> torch.Tensor:
        # window_index[i] = raster unit at encoder position i; its inverse maps raster -> encoder.
        # On the host: the model's own function runs its loops over grid_thw.tolist() (a few ms on a
        # 1344 px image), so the order is kept per grid and window geometry (read-only: do not write).
        visual = self.visual()
        grid = grid_thw.cpu()
        key = (tuple(grid.flatten().tolist()), visual.spatial_merge_size, visual.window_size, visual.patch_size)
        order = self._unit_orders.get(key)
        if order is None:
            order = torch.argsort(_window_index(visual, grid).cpu())
            if len(self._unit_orders) >= _MAX_ORDERS:
                self._unit_orders.clear()
            self._unit_orders[key] = order
        return order

    @functools.cached_property
    def _unit_orders(self) -> dict[tuple, torch.Tensor]:
        """This adapter's (this model's) unit orders, per grid and window geometry."""
        return {}
