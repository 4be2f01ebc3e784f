"""Compatibility names: the pretraining stack that lived here is split by role.

* :mod:`galore_jax.config` -- ``TrainConfig``, ``ConfigError``, validation, the CLI's choice
  constants, the model config, the lr schedule and ``build_optimizer``.
* :mod:`galore_jax.sharding` -- mesh, FSDP specs, parameter and batch shardings.
* :mod:`galore_jax.steps` -- the loss (``token_loss``), the whole-gradient and eval steps,
  ``select_train_step``.
* :mod:`galore_jax.layerwise` -- the train step with per-layer updates.
* :mod:`galore_jax.trainer` -- ``setup`` / ``Run``, resume checks, the host loop (``train``)
  and its ``Hooks``.
* :mod:`galore_jax.sample` -- ``load_for_inference`` and ``generate``.

Every name this module had is still importable from it (private ones included, for code
that used them). Patch the defining module, not this one: the loop reads its own globals.
"""

import jax

from galore_jax import (  # noqa: F401 - re-exported modules (tests reach some through here)
  adam8bit,
  checkpoint,
  metrics,
  projector,
  rundir,
  targets,
)
from galore_jax import model as model_lib  # noqa: F401
from galore_jax import optimizer as galore  # noqa: F401
from galore_jax.config import (  # noqa: F401
  DTYPES,
  OPTIMIZERS,
  SVD_METHODS,
  ConfigError,
  TrainConfig,
  absolute_source,
  base_model_config,
  build_optimizer,
  lr_schedule,
  model_config,
  parse_mesh,
  parse_profile_steps,
  validate,
)
from galore_jax.layerwise import _get_at, _replace_at, make_layerwise_step  # noqa: F401
from galore_jax.sample import generate, load_for_inference  # noqa: F401
from galore_jax.sharding import (  # noqa: F401
  batch_sharding,
  fsdp_spec,
  make_mesh,
  shardings_for,
)
from galore_jax.steps import (  # noqa: F401
  make_eval_step,
  make_train_step,
  mean_token_gradient,
  per_layer_updates,
  select_train_step,
)
from galore_jax.steps import summed_cross_entropy as _summed_cross_entropy  # noqa: F401
from galore_jax.steps import token_loss as _token_loss  # noqa: F401
from galore_jax.trainer import (  # noqa: F401
  _COMPAT_FLAGS,
  _MODEL_CONFIG_FLAGS,
  _NOT_IN_STATE,
  _RUN_OUTPUTS,
  LR_SPEC,
  Hooks,
  Parametrization,
  RefreshPrograms,
  Run,
  TrainingDiverged,
  TrainingInterrupted,
  _check_out,
  _init_config,
  _Signals,
  _train,
  _train_loop,
  abstract_batch,
  abstract_model,
  cached_train_step,
  check_compatible,
  compile_eval_step,
  compile_train_step,
  data_config,
  default_out,
  device_batch,
  evaluate,
  init_state,
  load_data,
  refresh_programs,
  run_meta,
  setup,
  tokenizer_hash,
  train,
)
from galore_jax.trainer import data_config as _data_config  # noqa: F401

# The paper's mask and the reference's projection side (galore_jax.targets), under the names
# plan.py and experiments/ use.
galore_mask = targets.llama_targets
torch_side_axes = targets.reference_side_axes


def process_rows(x):
  """This process's equal share of a global batch (axis 1). Kept for code that used it; the
  trainer takes each process's rows from the batch sharding
  (:func:`galore_jax.distributed.process_row_range`)."""
  n, i = jax.process_count(), jax.process_index()
  if n == 1:
    return x
  per = x.shape[1] // n
  return x[:, i * per : (i + 1) * per]
