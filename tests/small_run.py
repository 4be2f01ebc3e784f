"""The small training configuration (``TrainConfig`` fields) that the training tests share:
runs with the same shapes and ``--steps`` compile the same train step, which the session's
JAX cache (conftest) and the step cache then serve to every test that uses it."""

SMALL = dict(
  model="llama_tiny",
  batch_size=8,
  seq_len=32,
  eval_every=1000,
  eval_batches=2,
  save_every=1000,
  progress=False,
  rank=16,
  update_proj_gap=2,
)
