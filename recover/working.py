"""The working model: the fine-tuned model in memory and the moves recovery makes on it.

Its restorable parameters take the harmful-direction gradient, restore the top-k of their
sign-agreeing elements to aligned values, give some back to fine-tuned values (rollback) and
reset whole steps (undo). Aligned and fine-tuned values are read from disk one tensor at a
time, so no second full model is ever held.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from safealign.checkpoint import Checkpoint, CheckpointError
from safealign.recover.direction import cosine_backward
from safealign.recover.ledger import Ledger
from safealign.recover.rollback import choose_rollback, gathered_gradients
from safealign.recover.select import Picked, TopKPool, restore_candidates
from safealign.recover.weights import Layout, copy_into, load_working_model, model_tensor, read

#: Flat indices per tensor name.
Indices = dict[str, torch.Tensor]


class WorkingModel:
    """The fine-tuned model B in ``dtype`` on ``device``, with A and B open for reading."""

    def __init__(
        self,
        aligned: Checkpoint,
        finetuned: Checkpoint,
        layout: Layout,
        dtype: torch.dtype,
        device: str | None,
    ):
        self.aligned, self.finetuned, self.layout = aligned, finetuned, layout
        self.model, self.tokenizer = load_working_model(aligned, finetuned, dtype, device)
        self.params = {t.name: self.model.get_parameter(t.name) for t in layout.targets}
        self.grads: dict[str, torch.Tensor] = {}  # fp32 sums while accumulating
        self._paused = False  # rollback gradients must not reach ``grads``

    @contextmanager
    def holding_aligned(self) -> Iterator[None]:
        """A's weights in the model for the duration, B's back afterwards."""
        copy_into(self.model, self.aligned, self.aligned.names())
        try:
            yield
        finally:
            b = self.finetuned
            copy_into(
                self.model, b, b.lora_targets() + b.replaced_names() if b.is_adapter else b.names()
            )

    @contextmanager
    def accumulating(self) -> Iterator[None]:
        """Gradients of the restorable parameters summed in fp32 for the duration, from zero.

        Each backward's gradient leaves ``.grad`` as soon as it is complete and is added to an
        fp32 buffer (:attr:`grads`), so a bf16 model's gradients are summed at fp32 precision
        and ``.grad`` holds at most one backward's gradient at a time.
        """
        self.grads, handles = {}, []
        for name, param in self.params.items():
            param.requires_grad_(True)
            param.grad = None
            handles.append(param.register_post_accumulate_grad_hook(self._accumulate(name)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self.grads = {}
            for param in self.params.values():
                param.grad = None
                param.requires_grad_(False)

    def _accumulate(self, name: str):
        def hook(param: torch.Tensor) -> None:
            grad, param.grad = param.grad, None
            if self._paused:
                return
            total = self.grads.get(name)
            if total is None:
                self.grads[name] = grad.float()
            else:
                total.add_(grad)

        return hook

    def zero_grad(self) -> None:
        """Forget the summed gradients (the next :meth:`pull` starts from zero)."""
        self.grads = {}

    def pull(self, prompts: Sequence[str], target: torch.Tensor, batch_size: int) -> float:
        """Add the gradient of -cos(harmful centroid, ``target``) to :attr:`grads`; the mean
        loss."""
        return cosine_backward(
            self.model, self.tokenizer, prompts, self.layout.layer, target, batch_size
        )

    def candidates(self, k: int, ledger: Ledger | None) -> tuple[dict[str, Picked], int]:
        """The top-``k`` sign-agreeing elements by |gradient| (blocked by ``ledger`` if
        given), and how many elements were offered."""
        names = [t.name for t in self.layout.targets]
        pool, offered = TopKPool(k), 0
        for tensor_id, name in enumerate(names):
            param, grad = self.params[name], self.grads.get(name)
            if grad is None:
                continue
            aligned = read(self.aligned, name, param.dtype).to(param.device)
            blocked = None if ledger is None else ledger.blocked(name)
            for index, scores, values in restore_candidates(param, grad, aligned, blocked):
                offered += index.numel()
                pool.offer(tensor_id, index, scores, values)
            del aligned
        return pool.result(names), offered

    def restore(self, picked: dict[str, Picked]) -> Indices:
        """Write the picked aligned values; their indices."""
        self._write({n: (p.index, p.values) for n, p in picked.items()})
        return {n: p.index for n, p in picked.items()}

    def roll_back(
        self,
        restored: Indices,
        keep_sets: Sequence[tuple[Sequence[str], torch.Tensor]],
        share: float,
        batch_size: int,
        of_agreeing: bool = False,
    ) -> Indices:
        """Give ``share`` of ``restored`` back to B's values, chosen by a fresh gradient toward
        B's centroids on the kept sets (task training prompts, and benign prompts when given);
        see :func:`choose_rollback` for ``of_agreeing``. :attr:`grads` is left as it was."""
        self._paused = True
        try:
            grads = self._keep_gradients(restored, keep_sets, batch_size)
        finally:
            self._paused = False
        chosen = choose_rollback(self.model, self.finetuned, restored, grads, share, of_agreeing)
        self._write(chosen)
        return {name: index for name, (index, _) in chosen.items()}

    def _keep_gradients(self, restored: Indices, keep_sets, batch_size: int) -> Indices:
        """fp32 gradients toward the kept sets' centroids, at ``restored`` only."""
        grads: Indices = {}
        for prompts, centroid in keep_sets:
            part = gathered_gradients(
                self.model,
                self.tokenizer,
                prompts,
                self.layout.layer,
                centroid,
                restored,
                batch_size,
            )
            grads = {n: grads[n] + g if n in grads else g for n, g in part.items()}
        return grads

    @torch.no_grad()
    def reset(self, indices: Indices) -> None:
        """Put the elements at ``indices`` back to their fine-tuned values."""
        for name, index in indices.items():
            param = self.model.get_parameter(name)
            values = read(self.finetuned, name, param.dtype).reshape(-1)[index]
            param.view(-1)[index.to(param.device)] = values.to(param.device)

    def output_tensor(self, name: str) -> torch.Tensor:
        """The model's tensor for checkpoint name ``name``; the file's for tensors it lacks."""
        try:
            return model_tensor(self.model, name)
        except CheckpointError:
            return read(self.finetuned, name)

    @torch.no_grad()
    def _write(self, values: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        for name, (index, vals) in values.items():
            param = self.params[name]
            param.data.view(-1)[index.to(param.device)] = vals.to(param.device, param.dtype)
