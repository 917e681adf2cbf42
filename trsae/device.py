"""Where training, harvesting and evaluation run: a device name checked up front, the mixed precision the trainer
may use there, and batches moved onto it.

``"cpu"`` (the default everywhere) keeps every computation as it is without this module. ``"cuda"`` / ``"cuda:N"``
needs a CUDA build of torch and a visible GPU; asked for without them, `resolve` says so in one line instead of
failing deep inside a forward pass. Under ``torchrun`` on GPUs each process takes the GPU of its local rank
(`trsae.dist.dist_context`), and ``"cuda"`` means that one.

Mixed precision (`TrainConfig.amp`): ``"bfloat16"`` runs the forward under `torch.autocast` with that dtype; the
parameters, the optimiser state, the loss and every gradient stay float32. The SAEs' sparse paths take their
pre-activations back to the parameters' dtype right after the encoder's matmul (`trsae.saes.encoders`), so the
selection, the decode and the sparse backward run as without autocast, and the dominant ``[N, d] x [d, F]``
product runs in bfloat16.
"""

from __future__ import annotations

import contextlib
import os

import torch

from trsae.config import AMP_DTYPES, check_device


class DeviceError(RuntimeError):
    """A device that this machine or this torch build cannot provide."""


def no_cuda() -> str | None:
    """None where CUDA can run; else the torch that sees no CUDA device, in words (``torch 2.13.0+cpu (a CPU-only
    build)``), for the messages that say so."""
    if torch.cuda.is_available():
        return None
    built = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
    return f"torch {torch.__version__} ({built})"


def resolve(device: str) -> torch.device:
    """``device`` as a `torch.device`, refused with what to do when it cannot run here. Plain ``"cuda"`` under
    torchrun is the local rank's GPU."""
    check_device(device)
    if device == "cpu":
        return torch.device("cpu")
    why = no_cuda()
    if why is not None:
        raise DeviceError(f"device {device!r} asked for, but {why} sees no CUDA device; run on 'cpu', or install a "
                          "CUDA build of torch on a machine with a GPU")
    if device == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    index = int(device.split(":")[1])
    if index >= torch.cuda.device_count():
        raise DeviceError(f"device {device!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) are "
                          "visible")
    return torch.device(device)


def amp_dtype(amp: str | None) -> torch.dtype | None:
    """The autocast dtype of ``amp`` (None: no autocast)."""
    if amp is None:
        return None
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp must be None or one of {', '.join(AMP_DTYPES)}, got {amp!r}")
    return getattr(torch, amp)


def autocast(device: torch.device, amp: torch.dtype | None):
    """`torch.autocast` on ``device``'s type with ``amp``, or nothing when ``amp`` is None."""
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp)


def to_device(batch, device: torch.device):
    """A batch (a NamedTuple of tensors, e.g. `trsae.store.Batch`) with its tensors on ``device`` (the same tensors
    where they are there already)."""
    return type(batch)(*(t.to(device, non_blocking=True) if isinstance(t, torch.Tensor) else t for t in batch))
