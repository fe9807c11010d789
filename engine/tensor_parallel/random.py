"""RNG streams for dropout under tensor parallelism (Megatron-LM's CUDA RNG tracker, as an object).

Outside TP regions the activations are replicated across TP ranks, so their dropout masks must agree:
those draw from the default generator, seeded the same on every TP rank. Inside TP regions (attention
probabilities of this rank's heads; with sequence parallelism, every region that holds only this rank's
slice of the sequence) each rank holds different data and must draw different masks: those draw from
the "model-parallel" stream, seeded with an offset by TP rank. ``fork()`` swaps that stream in.
"""

from __future__ import annotations

import contextlib

import torch

TP_SEED_OFFSET = 2718


class RNGTracker:
    def __init__(self, seed: int, *, tp_rank: int, device: torch.device) -> None:
        self.device = device
        self.seed = seed + TP_SEED_OFFSET + tp_rank
        self._state = self._fresh_state()

    def _fresh_state(self) -> torch.Tensor:
        gen = torch.Generator(device=self.device).manual_seed(self.seed)
        return gen.get_state()

    @contextlib.contextmanager
    def fork(self):
        """Run the block on the model-parallel stream; the default stream is left where it was."""
        cuda = self.device.type == "cuda"
        saved = torch.cuda.get_rng_state(self.device) if cuda else torch.get_rng_state()
        if cuda:
            torch.cuda.set_rng_state(self._state, self.device)
        else:
            torch.set_rng_state(self._state)
        try:
            yield
        finally:
            self._state = torch.cuda.get_rng_state(self.device) if cuda else torch.get_rng_state()
            if cuda:
                torch.cuda.set_rng_state(saved, self.device)
            else:
                torch.set_rng_state(saved)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "state": self._state.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])
        self._state = state["state"].clone()
