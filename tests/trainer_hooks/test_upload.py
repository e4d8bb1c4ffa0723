"""``trainer_hooks.upload.upload_routing``, the host-to-device copy both hooks use: the ids
widened and transposed to ``int64 [routers, tokens, top_k]``, ``-1`` at native rows (and pad
rows when asked), on the CPU device."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from replay_bridge.layout import COMPLETION, NATIVE, PAD, PROMPT, HostRouting
from trainer_hooks.upload import upload_routing

REGION = np.array([PROMPT, PROMPT, COMPLETION, NATIVE, COMPLETION, PAD], np.int8)


def host_routing(dtype: type, region: np.ndarray = REGION, high: int = 8) -> HostRouting:
    """``[tokens, 3 routers, top-2]`` ids drawn below ``high`` in ``dtype``."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, high, (len(region), 3, 2)).astype(dtype)
    return HostRouting(ids, region.copy(), (1, 2, 3), ("s",), np.array([0, len(region)]))


def want(host: HostRouting, fill: np.ndarray | None) -> np.ndarray:
    out = host.ids.astype(np.int64).transpose(1, 0, 2).copy()
    if fill is not None:
        out[:, fill] = -1
    return out


@pytest.mark.parametrize("dtype,high", [(np.uint8, 256), (np.uint16, 65536)])
def test_native_rows_get_minus_one(dtype: type, high: int) -> None:
    host = host_routing(dtype, high=high)
    up = upload_routing(host, torch.device("cpu"))
    assert up.targets.dtype == torch.int64 and up.targets.is_contiguous()
    np.testing.assert_array_equal(up.targets.numpy(), want(host, REGION == NATIVE))
    assert up.region.dtype == torch.int64
    np.testing.assert_array_equal(up.region.numpy(), REGION)
    np.testing.assert_array_equal(up.filled.numpy(), REGION == NATIVE)
    assert up.staging == ()  # pinned staging only for a GPU


def test_without_native_rows_nothing_is_filled() -> None:
    region = np.where(REGION == NATIVE, PAD, REGION).astype(np.int8)
    host = host_routing(np.uint8, region)
    up = upload_routing(host, torch.device("cpu"))
    assert up.filled is None
    np.testing.assert_array_equal(up.targets.numpy(), want(host, None))


def test_fill_pad_fills_pad_and_native_rows() -> None:
    host = host_routing(np.uint16, high=65536)
    up = upload_routing(host, torch.device("cpu"), fill_pad=True)
    unreplayed = REGION >= PAD
    np.testing.assert_array_equal(up.filled.numpy(), unreplayed)
    np.testing.assert_array_equal(up.targets.numpy(), want(host, unreplayed))


def test_the_hooks_micro_batches_carry_the_upload() -> None:
    from trainer_hooks.hf._replay import _upload as hf_upload
    from trainer_hooks.megatron._replay import _upload as megatron_upload

    host = host_routing(np.uint8)
    cpu = torch.device("cpu")
    mb = megatron_upload(host, cpu)
    assert mb.has_native
    np.testing.assert_array_equal(mb.ids.numpy(), want(host, REGION == NATIVE))
    assert [t.data_ptr() for t in mb.targets] == [t.data_ptr() for t in mb.ids.unbind(0)]
    hf = hf_upload(host, (2, 3), cpu)
    np.testing.assert_array_equal(hf.targets.numpy(), want(host, REGION >= PAD))
    assert hf.replayed.shape == (len(REGION), 1)
    np.testing.assert_array_equal(hf.replayed[:, 0].numpy(), REGION < PAD)
