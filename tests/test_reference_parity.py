"""galore_adamw and galore_adafactor against the reference galore-torch GaLoreAdamW and
GaLoreAdafactor, number for number.

Needs the `reference` extra (torch, galore-torch); skipped with a reason without it.
"""

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tx_run import run_updates

import galore_jax
import galore_jax.projector

pytestmark = pytest.mark.reference
torch = pytest.importorskip("torch", reason="needs torch: pip install -e '.[reference]'")


def _load_reference(load_experiment):
  """galore_torch's AdamW and GaLoreProjector (``experiments/torch_reference.py``)."""
  try:
    adamw_cls, projector_cls, _ = load_experiment("torch_reference").load_galore_torch()
  except ModuleNotFoundError as e:
    if e.name != "galore_torch":  # installed, but something it imports is missing
      raise
    pytest.skip("needs galore-torch: pip install -e '.[reference]'")
  return adamw_cls, projector_cls


def _canonical(x, axis):
  """Same sign rule as galore_jax.projector.canonicalize_signs, in torch."""
  idx = torch.argmax(torch.abs(x), dim=axis, keepdim=True)
  peak = torch.gather(x, axis, idx)
  return x * torch.where(peak < 0, -1.0, 1.0)


@pytest.fixture(scope="module")
def reference(request, load_experiment):
  adamw_cls, projector_cls = _load_reference(load_experiment)
  original = projector_cls.get_orthogonal_matrix

  def patched(self, weights, rank, type):  # noqa: A002 - the reference's argument name
    out = original(self, weights, rank, type)
    if type == "right":
      return _canonical(out, 1)
    if type == "left":
      return _canonical(out, 0)
    return [_canonical(out[0], 0), _canonical(out[1], 1)]

  projector_cls.get_orthogonal_matrix = patched
  request.addfinalizer(lambda: setattr(projector_cls, "get_orthogonal_matrix", original))
  return adamw_cls


SHAPES = {"tall": (48, 24), "wide": (24, 40), "square": (32, 32), "stack_free_bias": (24,)}


def _gradients(steps, seed=0):
  """A gradient sequence with a decaying spectrum, so the top-r subspace is well separated."""
  rng = np.random.default_rng(seed)
  seq = []
  for _ in range(steps):
    g = {}
    for name, shape in SHAPES.items():
      if len(shape) == 1:
        g[name] = rng.normal(size=shape).astype(np.float32)
        continue
      m, n = shape
      k = min(m, n)
      u, _ = np.linalg.qr(rng.normal(size=(m, k)))
      v, _ = np.linalg.qr(rng.normal(size=(n, k)))
      s = 2.0 ** -np.arange(k, dtype=np.float64) * 3 + 1e-3
      g[name] = ((u * s) @ v.T).astype(np.float32)
    seq.append(g)
  return seq


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right", "full"])
def test_matches_galore_torch(reference, proj_type):
  steps, rank, gap, wd = 11, 6, 4, 0.1  # refreshes at 0, 4, 8: three of them
  sched = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 3, steps, 1e-3)
  grads = _gradients(steps)
  rng = np.random.default_rng(1)
  init = {k: rng.normal(size=s).astype(np.float32) * 0.1 for k, s in SHAPES.items()}

  # Reference: matrices in a GaLore group, the bias in a plain group, as torchrun_main does.
  tparams = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in init.items()}
  matrices = [tparams[k] for k, s in SHAPES.items() if len(s) == 2]
  groups = [
    {"params": [tparams["stack_free_bias"]]},
    {
      "params": matrices,
      "rank": rank,
      "update_proj_gap": gap,
      "scale": 0.25,
      "proj_type": proj_type,
    },
  ]
  opt = reference(groups, lr=1.0, weight_decay=wd, no_deprecation_warning=True)
  for t, g in enumerate(grads):
    for group in opt.param_groups:
      group["lr"] = float(sched(t))
    for k, p in tparams.items():
      p.grad = torch.tensor(g[k])
    opt.step()
  expected = {k: p.detach().numpy() for k, p in tparams.items()}

  tx = galore_jax.galore_adamw(
    sched, rank=rank, update_proj_gap=gap, scale=0.25, proj_type=proj_type, weight_decay=wd
  )
  params, _ = run_updates(tx, init, grads)

  for k in SHAPES:
    change = np.max(np.abs(expected[k] - init[k]))
    err = np.max(np.abs(np.asarray(params[k]) - expected[k]))
    assert change > 1e-3, k  # the comparison is about a real trajectory
    assert err / change <= 1e-4, f"{proj_type}/{k}: rel err {err / change:.2e}"


@pytest.fixture(scope="module")
def reference_adafactor(reference):
  """galore_torch's Adafactor (GaLoreAdafactor), its SVD patched as ``reference``'s."""
  import importlib

  pytest.importorskip("transformers", reason="galore_torch.adafactor imports transformers")
  return importlib.import_module("galore_torch.adafactor").Adafactor


@pytest.mark.parametrize(
  "kwargs",
  [
    {},  # the reference's defaults: relative step size scaled by RMS(W), no first moment
    {"beta1": 0.9, "weight_decay": 0.1, "proj_type": "reverse_std"},
    {"lr": 3e-3, "relative_step": False, "scale_parameter": False, "weight_decay": 0.05},
  ],
  ids=["defaults", "beta1_decay_reverse", "fixed_lr"],
)
def test_galore_adafactor_matches_galore_torch(reference_adafactor, kwargs):
  steps, rank, gap = 11, 6, 4  # refreshes at 0, 4, 8
  kwargs = dict(kwargs)
  proj_type = kwargs.pop("proj_type", "std")
  grads = _gradients(steps)
  rng = np.random.default_rng(1)
  init = {k: rng.normal(size=s).astype(np.float32) * 0.1 for k, s in SHAPES.items()}

  # The reference in float64 (its SVD stays float32): Adafactor's steps are ~1e-3 of weights
  # ~0.3, so float32 weights alone round ~1e-4 of the change in 11 steps (torch's own float32
  # run is that far from its float64 one).
  tparams = {k: torch.nn.Parameter(torch.tensor(v, dtype=torch.float64)) for k, v in init.items()}
  matrices = [tparams[k] for k, s in SHAPES.items() if len(s) == 2]
  groups = [
    {"params": [tparams["stack_free_bias"]]},
    {
      "params": matrices,
      "rank": rank,
      "update_proj_gap": gap,
      "scale": 0.25,
      "proj_type": proj_type,
    },
  ]
  opt = reference_adafactor(groups, **kwargs)
  for g in grads:
    for k, p in tparams.items():
      p.grad = torch.tensor(g[k], dtype=torch.float64)
    opt.step()
  expected = {k: p.detach().numpy() for k, p in tparams.items()}

  lr = kwargs.pop("lr", None)
  tx = galore_jax.galore_adafactor(
    lr, rank=rank, update_proj_gap=gap, scale=0.25, proj_type=proj_type, **kwargs
  )
  params, _ = run_updates(tx, init, grads)

  for k in SHAPES:
    change = np.max(np.abs(expected[k] - init[k]))
    err = np.max(np.abs(np.asarray(params[k], np.float64) - expected[k]))
    assert change > 3e-4, k  # the comparison is about a real trajectory
    # Measured <= 1e-4; scaling by RMS of the projected weight instead of the whole one (what
    # galore(optax.adafactor(...)) does) is 1e-2 to 6e-2 off.
    assert err / change <= 3e-4, f"{k}: rel err {err / change:.2e}"


@pytest.mark.parametrize("name", ["tall", "wide", "square"])
def test_basis_equals_torch_svd_after_canonicalisation(name):
  """Both SVDs agree up to sign; the canonical sign rule makes them identical."""
  g = _gradients(1)[0][name]
  u_t, _, vh_t = torch.linalg.svd(torch.tensor(g), full_matrices=False)
  right = galore_jax.projector.exact_basis(jnp.asarray(g), "right", 6)
  left = galore_jax.projector.exact_basis(jnp.asarray(g), "left", 6)
  np.testing.assert_allclose(np.asarray(right), _canonical(vh_t[:6], 1).numpy(), atol=1e-5)
  np.testing.assert_allclose(np.asarray(left), _canonical(u_t[:, :6], 0).numpy(), atol=1e-5)
