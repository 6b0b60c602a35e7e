"""Host-to-device copies that never wait for the GPU."""

import torch


def to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """values (a list or an array) as a tensor on device. On a GPU the copy goes through pinned memory and
    does not block: one from pageable memory waits for the stream, which would end async scheduling's overlap
    of the host's work with the GPU's."""
    tensor = torch.as_tensor(values, dtype=dtype)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor
