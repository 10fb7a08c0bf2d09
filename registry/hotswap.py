"""Hot swap: one loaded copy of the base model serves every version by copying only the edited tensors.

Switching from version a to version b writes b's tensors and puts the base value back for tensors that
only a changed. Tensors come from an LRU of recently used versions, so a switch is a few in-memory
copies (milliseconds). Readers of one version share the weights; a switch waits until no reader is
inside, so a query never runs on half-swapped weights. One batch may also mix versions (``use_rows``).
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from registry.store import Registry


class HotSwapModel:
    """``with holder.use("v3") as model: ...`` runs the body on version v3's weights."""

    def __init__(self, model: nn.Module, registry: Registry, model_name: str, capacity: int = 8) -> None:
        self.model = model
        self.registry = registry
        self.name = model_name
        self.capacity = capacity
        self.params = dict(model.named_parameters())
        self.current = "v0"
        self.applied: dict[str, str] = {}  # tensor name → digest now in the model (absent: base value)
        self._lru: OrderedDict[str, tuple[dict[str, str], dict[str, torch.Tensor]]] = OrderedDict()
        self._base: dict[str, torch.Tensor] = {}
        self._readers = 0
        self._cond = threading.Condition()

    def _load(self, version_id: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
        digests = self.registry.live(self.name, version_id).tensors
        tensors = {
            n: self.registry.blobs.get(d).to(self.params[n].device, self.params[n].dtype) for n, d in digests.items()
        }
        return digests, tensors

    def _remember(self, version_id: str, loaded: tuple[dict[str, str], dict[str, torch.Tensor]]) -> None:
        self._lru[version_id] = loaded
        self._lru.move_to_end(version_id)
        while len(self._lru) > self.capacity:
            self._lru.popitem(last=False)

    def _version_tensors(self, version_id: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
        """(digests, tensors) of a version; manifests are immutable, so an LRU hit touches no file."""
        if version_id in self._lru:
            self._lru.move_to_end(version_id)
        else:
            self._remember(version_id, self._load(version_id))
        return self._lru[version_id]

    def _base_value(self, name: str) -> torch.Tensor:
        if name not in self._base:
            t = self.registry.base_tensor(self.name, name)
            self._base[name] = t.to(self.params[name].device, self.params[name].dtype)
        return self._base[name]

    def base_tensors(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """v0's value of each named tensor (read from the registry once, then kept)."""
        return {name: self._base_value(name) for name in names}

    @property
    def differing(self) -> list[str]:
        """The tensors that the weights in place now hold at other values than v0's."""
        return list(self.applied)

    @torch.no_grad()
    def _switch(self, version_id: str) -> None:
        digests, tensors = self._version_tensors(version_id)
        for name in list(self.applied):
            if name not in digests:
                self.params[name].copy_(self._base_value(name))
                del self.applied[name]
        for name, digest in digests.items():
            if self.applied.get(name) != digest:
                self.params[name].copy_(tensors[name])
                self.applied[name] = digest
        self.current = version_id

    def preload(self, ref: str) -> str:
        """Load ``ref``'s tensors into the LRU without putting them in the model (the next switch is copies only)."""
        version_id = self.registry.resolve(self.name, ref)
        with self._cond:
            if version_id in self._lru:
                return version_id
        loaded = self._load(version_id)  # file reads outside the lock: queries go on meanwhile
        with self._cond:
            self._remember(version_id, loaded)
        return version_id

    @property
    def cached_versions(self) -> list[str]:
        with self._cond:
            return list(self._lru)

    def switch_to(self, ref: str) -> str:
        """Make ``ref`` the weights in place now (waits for readers of another version to finish)."""
        version_id = self.registry.resolve(self.name, ref)
        with self._cond:
            self._cond.wait_for(lambda: self._readers == 0 or self.current == version_id)
            if self.current != version_id:
                self._switch(version_id)
        return version_id

    def _row_weights(self, host: str, version_id: str) -> dict[str, torch.Tensor]:
        """The tensors in which ``version_id`` differs from ``host``, at ``version_id``'s values."""
        host_digests, _ = self._version_tensors(host)
        digests, tensors = self._version_tensors(version_id)
        return {n: tensors[n] if n in digests else self._base_value(n)
                for n in set(digests) | set(host_digests) if digests.get(n) != host_digests.get(n)}

    @contextlib.contextmanager
    def use_rows(self, rows_of: dict[str, list[int]]) -> Iterator[nn.Module]:
        """Run one batch whose rows ask for different versions (``{version ref: row indices}``).

        The version with the most rows is put in place; for every other version, each tensor it changed
        differently is applied to its own rows by a forward hook on the module holding it, out[rows] = x[rows] Wᵀ
        (+ bias). Every layer those versions did not change is shared by all the rows. Hooks act only in the
        calling thread, so other readers of the model never see them.
        """
        ids: dict[str, list[int]] = {}
        for ref, rows in rows_of.items():  # two names of one version ("latest", "v3") share its weights
            ids.setdefault(self.registry.resolve(self.name, ref), []).extend(rows)
        host = max(ids, key=lambda v: (len(ids[v]), v == self.current))
        owner = threading.get_ident()
        modules = dict(self.model.named_modules())
        hooks = []

        def override(module: nn.Module, rows: torch.Tensor, weight: torch.Tensor):
            transposed = type(module).__name__ == "Conv1D"  # GPT-2 stores (d_in, d_out)

            def hook(_, inputs, output):
                if threading.get_ident() == owner:
                    x = inputs[0][rows]
                    y = x @ weight if transposed else x @ weight.T
                    output[rows] = y if module.bias is None else y + module.bias
                return output
            return module.register_forward_hook(hook)

        with self.use(host) as model:
            try:
                with self._cond:
                    others = {v: self._row_weights(host, v) for v in ids if v != host}
                for version_id, weights in others.items():
                    rows = torch.tensor(ids[version_id], device=next(iter(self.params.values())).device)
                    for name, weight in weights.items():
                        module = modules[name.rsplit(".", 1)[0]]
                        if name.rsplit(".", 1)[1] != "weight" or type(module).__name__ not in ("Linear", "Conv1D"):
                            raise ValueError(f"{name} cannot be applied per row; serve {version_id} on its own")
                        hooks.append(override(module, rows, weight))
                yield model
            finally:
                for h in hooks:
                    h.remove()

    @contextlib.contextmanager
    def use(self, ref: str) -> Iterator[nn.Module]:
        version_id = self.registry.resolve(self.name, ref)
        with self._cond:
            self._cond.wait_for(lambda: self._readers == 0 or self.current == version_id)
            if self.current != version_id:
                self._switch(version_id)
            self._readers += 1
        try:
            yield self.model
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()
