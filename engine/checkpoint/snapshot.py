"""A host copy of a state dict, taken on the training thread so a background thread can write it while
training goes on (``train.async_save``).

Tensors are copied storage by storage, and every tensor is rebuilt as the same view (offset, size, stride)
of its storage's copy: views and tied weights keep sharing, and ``torch.save`` of the snapshot writes the
same bytes as ``torch.save`` of the live state (which also writes whole storages). The copies go into host
buffers (pinned for CUDA storages) that are kept and reused by the next snapshot when the sizes match (the
previous write has finished by then: at most one save is in flight). Everything else is deep-copied, with
the aliasing between objects preserved (``copy.deepcopy`` with the tensor copies in its memo).
"""

from __future__ import annotations

import copy

import torch


def _tensors(obj, found: dict[int, torch.Tensor]) -> None:
    """Collect the tensors reachable through dicts, lists, tuples and sets (what state dicts are made of)."""
    if isinstance(obj, torch.Tensor):
        found.setdefault(id(obj), obj)
    elif isinstance(obj, dict):
        for value in obj.values():
            _tensors(value, found)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for value in obj:
            _tensors(value, found)


class HostSnapshot:
    """Takes snapshots; keeps the host buffers (pinned for CUDA sources) for reuse by the next one."""

    def __init__(self) -> None:
        self._buffers: list[tuple[torch.UntypedStorage, bool]] = []  # (buffer, pinned) by order in the state
        self._next = 0

    def take(self, state: dict) -> dict:
        """A copy of ``state`` that no later training step can change. Returns when the copies are complete.
        Overwrites the buffers of the previous snapshot: that one must no longer be in use."""
        found: dict[int, torch.Tensor] = {}
        _tensors(state, found)
        # Keyed like torch.save's own de-duplication: by the storage object behind the tensor (alive as long
        # as the tensors in ``found`` are).
        storages: dict[int, torch.UntypedStorage] = {}
        memo: dict[int, object] = {}
        cuda_devices: list[torch.device] = []
        self._next = 0
        for key, tensor in found.items():
            memo[key] = self._copy_tensor(tensor, storages, cuda_devices)
        del self._buffers[self._next :]  # storages the state no longer has
        for device in cuda_devices:  # the copies were queued non-blocking on the current stream
            torch.cuda.current_stream(device).synchronize()
        return copy.deepcopy(state, memo)

    def _copy_tensor(self, t: torch.Tensor, storages: dict, cuda_devices: list) -> torch.Tensor:
        if t.layout != torch.strided or t.device.type not in ("cpu", "cuda") or t.is_quantized:
            out = t.detach().to("cpu", copy=True)  # rare kinds: a plain copy (no sharing kept)
        else:
            src = t.untyped_storage()
            dst = storages.get(src._cdata)
            if dst is None:
                dst = storages[src._cdata] = self._copy_storage(src, pinned=t.device.type == "cuda")
                if t.device.type == "cuda" and t.device not in cuda_devices:
                    cuda_devices.append(t.device)
            out = torch.empty(0, dtype=t.dtype).set_(dst, t.storage_offset(), t.size(), t.stride())
        if isinstance(t, torch.nn.Parameter):
            return torch.nn.Parameter(out, requires_grad=t.requires_grad)
        if t.requires_grad and out.is_leaf:
            out.requires_grad_(True)
        return out

    def _copy_storage(self, src: torch.UntypedStorage, *, pinned: bool) -> torch.UntypedStorage:
        """Copy ``src`` into the buffer of its position in the state, reused when the size (and pinning)
        match. Reuse matters on CPU too: copying into memory already touched is several times faster than
        into fresh pages (no page faults). CUDA sources go to pinned memory: the device-to-host copy then runs
        at full PCIe speed and asynchronously."""
        index, self._next = self._next, self._next + 1
        dst, was_pinned = self._buffers[index] if index < len(self._buffers) else (None, False)
        if dst is None or dst.nbytes() != src.nbytes() or was_pinned != pinned:
            dst = None
            if pinned:
                try:
                    dst = torch.empty(src.nbytes(), dtype=torch.uint8, pin_memory=True).untyped_storage()
                except RuntimeError:  # pinned memory exhausted / not allowed: pageable memory still works
                    pass
            if dst is None:
                dst = torch.empty(src.nbytes(), dtype=torch.uint8).untyped_storage()
            entry = (dst, pinned)  # pinned: what was asked (a fallback to pageable memory is not retried)
            if index < len(self._buffers):
                self._buffers[index] = entry
            else:
                self._buffers.append(entry)
        dst.copy_(src, non_blocking=pinned)
        return dst
