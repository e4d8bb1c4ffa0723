"""One micro-batch's routing sent from the host to the trainer's device.

Both hooks (``trainer_hooks.megatron``, ``trainer_hooks.hf``) upload a
:class:`~replay_bridge.layout.HostRouting` the same way: the narrow ids and the region codes
are copied as they are (from pinned memory and without blocking when the device is a GPU),
then widened on the device to ``int64 [routers, tokens, top_k]`` in one copy, with ``-1`` at
the rows the router routes with its own top-k.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from replay_bridge.layout import NATIVE, PAD, HostRouting

__all__ = ["DeviceRouting", "upload_routing"]


class DeviceRouting(NamedTuple):
    """One micro-batch's routing on the device.

    ``targets``: ``int64 [routers, tokens, top_k]``, ``-1`` at the ``filled`` rows.
    ``region``: ``int64 [tokens]``, the layout's region codes.
    ``filled``: ``bool [tokens]``, the rows set to ``-1``; ``None`` when none was.
    ``staging``: the pinned host tensors of the copy (held until the copy is done).
    """

    targets: torch.Tensor
    region: torch.Tensor
    filled: torch.Tensor | None
    staging: tuple[torch.Tensor, ...]


def upload_routing(
    host: HostRouting, device: torch.device, *, fill_pad: bool = False
) -> DeviceRouting:
    """Send ``host`` to ``device`` without waiting and widen its ids there.

    ``-1`` goes to the targets at native rows (region :data:`~replay_bridge.layout.NATIVE`),
    and with ``fill_pad`` at pad rows too (region :data:`~replay_bridge.layout.PAD`). Without
    ``fill_pad`` a micro-batch with no native row is not masked at all (``filled`` is
    ``None``); with it the mask is always built. No host sync either way.
    """
    ids = torch.from_numpy(host.ids)
    region = torch.from_numpy(host.region)
    staging: tuple[torch.Tensor, ...] = ()
    if device.type == "cuda":
        ids, region = ids.pin_memory(), region.pin_memory()
        staging = (ids, region)
    d_ids = ids.to(device, non_blocking=True)
    d_region = region.to(device, non_blocking=True).long()
    uint16 = d_ids.dtype == torch.uint16
    if uint16:  # widened through int16 (uint16 casts are not supported everywhere)
        d_ids = d_ids.view(torch.int16)
    # [tokens, routers, k] -> [routers, tokens, k] int64, widened and transposed in one copy
    wide = d_ids.permute(1, 0, 2).to(torch.int64, memory_format=torch.contiguous_format)
    if uint16:
        wide.bitwise_and_(0xFFFF)
    filled: torch.Tensor | None = None
    if fill_pad:
        filled = d_region >= PAD  # pad and native rows
    elif host.has_native:
        filled = d_region == NATIVE
    if filled is not None:
        wide.masked_fill_(filled.view(1, -1, 1), -1)
    return DeviceRouting(wide, d_region, filled, staging)
