"""The step's staging on the GPU: a pinned mirror is refilled only after the copy queued from it has run, even
when nothing else makes the host wait for the GPU (as through a long prompt's chunks, which sample nothing)."""

import pytest
import torch

from minivllm.engine.step_inputs import Layout, Staging

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_a_mirror_is_refilled_only_after_its_copy_ran():
    staging = Staging(4096, torch.device("cuda"), growable=False)
    layout = Layout()
    layout.add("x", torch.int64, 64)
    mirror, host = staging.host(layout)
    host["x"][:] = 1
    torch.cuda._sleep(200_000_000)  # the GPU busy for a while: the copy below waits behind it
    first = staging.send(layout, mirror)["x"].clone()  # the first step's inputs as its kernels would read them
    mirror, host = staging.host(layout)
    host["x"][:] = 2
    staging.send(layout, mirror)
    mirror, host = staging.host(layout)  # the first mirror again: its copy must have run by now
    host["x"][:] = 3
    torch.cuda.synchronize()
    assert first.tolist() == [1] * 64

