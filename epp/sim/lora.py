"""A pod's LoRA adapters as vLLM 0.32 keeps them: the served registry, weights in CPU memory,
and the GPU slots of the running batch.

Three tiers, because each costs something different and a placement policy must see all three:

* **registry** (``/v1/models``): adapters the server accepts requests for, added by
  ``--lora-modules`` at start or ``POST /v1/load_lora_adapter`` at run time. Unbounded, as in
  vLLM (``--max-loras`` does not limit it).
* **CPU cache** (``max_cpu_loras``, default ``max_loras``; LRU): adapter weights read from
  disk. A runtime load reads the adapter into it (``lora_load_time``); an adapter evicted
  from it is read from disk again by the step that next uses it, and that step pays
  ``lora_load_time`` — the cost of serving more adapters than a pod's memory holds.
* **GPU slots** (``max_loras``; LRU): the adapters a running batch may mix. Entering a slot
  costs ``lora_load_delay``; a waiting request whose adapter finds every slot busy with
  running adapters waits (the engine's LoRA budget).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from epp.sim.config import LoraModule


@dataclass(slots=True)
class LoraTiers:
    gpu_slots: int
    cpu_slots: int
    registry: dict[str, LoraModule] = field(default_factory=dict)
    ids: dict[str, int] = field(default_factory=dict)
    cpu: OrderedDict[str, None] = field(default_factory=OrderedDict)
    gpu: OrderedDict[str, None] = field(default_factory=OrderedDict)
    next_id: int = 1
    #: reads from disk (runtime loads + CPU-cache misses) and GPU slot entries, for tests
    disk_reads: int = 0
    gpu_loads: int = 0

    def register(self, module: LoraModule) -> bool:
        """Add ``module`` to the registry with its weights in CPU memory (a load that already
        paid its disk read). False if the name is registered."""
        if module.name in self.registry:
            return False
        self.registry[module.name] = module
        self.ids[module.name] = self.next_id
        self.next_id += 1
        self._to_cpu(module.name)
        return True

    def replace(self, module: LoraModule) -> None:
        """``load_inplace``: new weights under a registered name (same id, fresh GPU copy)."""
        self.registry[module.name] = module
        self.gpu.pop(module.name, None)
        self._to_cpu(module.name)

    def unregister(self, name: str) -> bool:
        if name not in self.registry:
            return False
        del self.registry[name]
        del self.ids[name]
        self.cpu.pop(name, None)
        self.gpu.pop(name, None)
        return True

    def use(self, name: str) -> tuple[int, int]:
        """A request for ``name`` joins the running batch: (GPU slot loads, disk reads) it costs."""
        gpu = self.gpu
        if name in gpu:
            gpu.move_to_end(name)
            self.cpu.move_to_end(name)
            return 0, 0
        disk = 0
        if name in self.cpu:
            self.cpu.move_to_end(name)
        else:
            disk = 1
            self.disk_reads += 1
            self._to_cpu(name)
        gpu[name] = None
        self.gpu_loads += 1
        while len(gpu) > self.gpu_slots:
            gpu.popitem(last=False)
        return 1, disk

    def _to_cpu(self, name: str) -> None:
        cpu = self.cpu
        cpu[name] = None
        cpu.move_to_end(name)
        while len(cpu) > self.cpu_slots:
            evicted, _ = cpu.popitem(last=False)
            self.gpu.pop(evicted, None)  # vLLM's LRU cache deactivates what it evicts
