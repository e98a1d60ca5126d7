"""The accelerators we plan, measure and launch on: one table (standard library only, so ``launch/`` can use it).

Peak dense bfloat16 matmul FLOP/s of one chip (no structured sparsity) and HBM per chip, from the vendors' pages:

* TPU v4 275 TFLOP/s and 32 GiB, v5e 197 and 16, v5p 459 and 95, v6e (Trillium) 918 and 32: Google Cloud TPU
  documentation, the "System architecture" page of each version (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e).
* NVIDIA A100 SXM 312 TFLOP/s (A100 datasheet, "BF16 Tensor Core", 624 with sparsity); H100 SXM and H200 SXM 989
  TFLOP/s (their datasheets list 1,979 "with sparsity"; dense is half).

TPU slices are named two ways: libtpu topologies (``v5p:4x4x4``, chips along each dimension) and Cloud TPU
accelerator types (``v5p-128``), which count TensorCores for v4 / v5p (two per chip) and chips for v5e / v6e.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator chip.

  Attributes:
    name: our name ('v5p', 'h100').
    peak_bf16_flops: peak dense bf16 FLOP/s.
    device_kinds: lower-case substrings of ``jax.Device.device_kind`` that identify the chip.
    hbm_gib: HBM per chip (TPUs; None where we do not plan for it).
    topology_names: TPU only: the generation names libtpu topologies use ('v5e' and 'v5litepod').
    topology_dims: TPU only: the dimensions of a topology (3 for v4 / v5p, 2 for v5e / v6e).
    accelerator_prefix: TPU only: the Cloud TPU accelerator-type family ('v5litepod' for v5e).
    cores_per_chip: TPU only: TensorCores per chip (what v4 / v5p accelerator types count).
    runtime_version: TPU only: the default TPU VM runtime version.
    single_host_chips: TPU only: the largest slice one TPU VM host serves (multi-host slices have 4 per host).
  """

  name: str
  peak_bf16_flops: float
  device_kinds: tuple[str, ...]
  hbm_gib: int | None = None
  topology_names: tuple[str, ...] = ()
  topology_dims: int = 0
  accelerator_prefix: str = ""
  cores_per_chip: int = 1
  runtime_version: str = ""
  single_host_chips: int = 0

  @property
  def is_tpu(self) -> bool:
    return bool(self.topology_names)

  def accelerator_type(self, chips: int) -> str:
    """The Cloud TPU accelerator type of a slice of ``chips`` chips, e.g. v5p with 4 chips -> 'v5p-8'."""
    return f"{self.accelerator_prefix}-{chips * self.cores_per_chip}"


# Order matters for device kinds: 'tpu v5 lite' must be tried before 'tpu v5'.
CHIPS = (
    Chip("v6e", 918e12, ("tpu v6 lite", "tpu v6e"), 32, ("v6e",), 2, "v6e", 1, "v2-alpha-tpuv6e", 8),
    Chip(
        "v5e", 197e12, ("tpu v5 lite", "tpu v5e"), 16, ("v5e", "v5litepod"), 2, "v5litepod", 1, "v2-alpha-tpuv5-lite", 8
    ),
    Chip("v5p", 459e12, ("tpu v5p", "tpu v5"), 95, ("v5p",), 3, "v5p", 2, "v2-alpha-tpuv5", 4),
    Chip("v4", 275e12, ("tpu v4",), 32, ("v4",), 3, "v4", 2, "tpu-ubuntu2204-base", 4),
    Chip("a100", 312e12, ("a100",)),
    Chip("h100", 989e12, ("h100",)),
    Chip("h200", 989e12, ("h200",)),
)
BY_NAME = {c.name: c for c in CHIPS}
TPUS = tuple(c for c in CHIPS if c.is_tpu)


def get(name: str) -> Chip:
  """The chip called ``name`` (case-insensitive); raises ValueError naming the known ones."""
  key = str(name).lower()
  if key not in BY_NAME:
    raise ValueError(f"chip {name!r}: unknown; expected one of {sorted(BY_NAME)}")
  return BY_NAME[key]


def of_device_kind(device_kind: str) -> Chip | None:
  """The chip of a ``jax.Device.device_kind`` ('TPU v5', 'NVIDIA H100 80GB HBM3', ...); None if unknown (CPU)."""
  kind = str(device_kind).lower()
  for chip in CHIPS:
    if any(needle in kind for needle in chip.device_kinds):
      return chip
  return None


def of_topology_name(generation: str) -> Chip | None:
  """The TPU whose libtpu topologies start with ``generation`` ('v5litepod' -> v5e); None if unknown."""
  return next((c for c in TPUS if generation in c.topology_names), None)


def of_accelerator_prefix(prefix: str) -> Chip | None:
  """The TPU of a Cloud TPU accelerator-type family ('v5litepod' -> v5e); None if unknown."""
  return next((c for c in TPUS if c.accelerator_prefix == prefix), None)
