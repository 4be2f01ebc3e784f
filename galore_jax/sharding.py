"""Device mesh and shardings: params and optimizer state over ``fsdp``, batches over every
device (``data x fsdp``)."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from galore_jax.config import TrainConfig, parse_mesh


def make_mesh(cfg: TrainConfig) -> Mesh:
  data_n, fsdp_n = parse_mesh(cfg.mesh)
  devices = np.asarray(jax.devices()[: data_n * fsdp_n]).reshape(data_n, fsdp_n)
  return Mesh(devices, ("data", "fsdp"))


def fsdp_spec(shape: tuple[int, ...], fsdp: int) -> P:
  """Shards the largest axis that ``fsdp`` divides; replicates what cannot be split."""
  if fsdp == 1 or not shape:
    return P()
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % fsdp == 0 and shape[axis] >= fsdp:
      spec = [None] * len(shape)
      spec[axis] = "fsdp"
      return P(*spec)
  return P()


def shardings_for(tree, mesh: Mesh):
  fsdp = mesh.shape["fsdp"]
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), fsdp)), tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  # (grad_accum, batch, seq): micro-batches are split over every device.
  return NamedSharding(mesh, P(None, ("data", "fsdp"), None))


def shard_batch(
  mesh: Mesh, batch: dict[str, np.ndarray], grad_accum: int, *, local_rows_of: int | None = None
) -> dict[str, jax.Array]:
  """Host batch (grad_accum * B, L) -> global device arrays (grad_accum, B, L).

  On several processes ``make_array_from_process_local_data`` assembles the global array
  from each process's rows (:func:`galore_jax.distributed.global_batch`).
  ``local_rows_of=B``: ``batch`` holds only this process's rows of a global micro-batch
  of ``B`` (the training stream); None: it is a whole global batch and each process passes
  its own rows.
  """
  from galore_jax import distributed

  return distributed.global_batch(batch_sharding(mesh), batch, grad_accum, local_rows_of)
