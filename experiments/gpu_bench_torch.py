"""The torch side of ``experiments/gpu_bench.py``: galore-torch's ``GaLoreAdamW`` on HF LLaMA.

``worker_torch`` runs in its own subprocess (``gpu_bench.py --worker SPEC``): Hugging Face
``LlamaForCausalLM`` with the JAX model's shape, trained by the reference optimizer
(loaded by ``experiments/torch_reference.py``) with the paper's parameter groups; every
step timed with a device synchronisation, then a refresh step. torch and transformers
are imported inside the worker, which reports ``unavailable`` without them.
"""

from __future__ import annotations

import math
import platform
import time

from gpu_bench_common import median, refresh_reps
from torch_reference import load_galore_torch

GALORE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _hf_config(transformers, spec):
  import inspect

  mc = spec["model_shape"]
  kwargs = dict(
    vocab_size=spec["vocab_size"],
    hidden_size=mc["hidden_size"],
    intermediate_size=mc["intermediate_size"],
    num_hidden_layers=mc["num_layers"],
    num_attention_heads=mc["num_heads"],
    num_key_value_heads=mc["num_heads"],
    max_position_embeddings=mc["max_seq_len"],
    rms_norm_eps=mc["rms_eps"],
    hidden_act="silu",
    initializer_range=0.02,
    tie_word_embeddings=False,
    attention_bias=False,
    mlp_bias=False,
    use_cache=False,
  )
  params = inspect.signature(transformers.LlamaConfig.__init__).parameters
  if "rope_parameters" in params:  # transformers 5.x
    kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": mc["rope_base"]}
  else:
    kwargs["rope_theta"] = mc["rope_base"]
  return transformers.LlamaConfig(**kwargs)


def worker_torch(spec, res, save):
  try:
    import torch
    import transformers
  except ImportError as e:
    res.update(status="unavailable", error=f"{type(e).__name__}: {e}")
    return
  adamw_cls, projector_cls, origin = load_galore_torch(spec.get("galore_torch"))
  import torch.nn.functional as F

  cuda = torch.cuda.is_available() and spec["device"] != "cpu"
  dev = torch.device("cuda" if cuda else "cpu")
  dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[spec["dtype"]]
  if spec.get("torch_threads"):
    torch.set_num_threads(spec["torch_threads"])
  torch.manual_seed(0)
  res.update(
    torch_threads=torch.get_num_threads(),
    torch_version=torch.__version__,
    transformers_version=transformers.__version__,
    galore_torch=origin,
    backend=dev.type,
    device=torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
  )
  sync = torch.cuda.synchronize if cuda else (lambda: None)
  config = _hf_config(transformers, spec)
  t = time.perf_counter()
  with dev:
    model = transformers.LlamaForCausalLM(config)
  model.to(dtype)
  model.train()
  sync()
  res["init_s"] = time.perf_counter() - t
  res["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
  res["n_params"] = sum(p.numel() for p in model.parameters())
  galore_params = [
    m.weight
    for name, m in model.named_modules()
    if isinstance(m, torch.nn.Linear) and name.split(".")[-1] in GALORE_TARGETS
  ]
  ids = {id(p) for p in galore_params}
  regular = [p for p in model.parameters() if id(p) not in ids]
  T = spec["update_proj_gap"]
  opt = adamw_cls(
    [
      {"params": regular},
      {
        "params": galore_params,
        "rank": spec["rank"],
        "update_proj_gap": T,
        "scale": spec["galore_scale"],
        "proj_type": "std",
      },
    ],
    lr=spec["lr"],
    weight_decay=0.0,
    no_deprecation_warning=True,
  )
  res["galore_params"] = len(galore_params)
  g = torch.Generator().manual_seed(0)
  toks = torch.randint(
    0, spec["vocab_size"], (spec["batch_size"], spec["seq_len"] + 1), generator=g
  ).to(dev)
  inputs, targets = toks[:, :-1].contiguous(), toks[:, 1:].contiguous()
  vocab = spec["vocab_size"]
  losses = []

  def fwd_bwd():
    logits = model(input_ids=inputs, use_cache=False).logits
    loss = F.cross_entropy(logits.float().reshape(-1, vocab), targets.reshape(-1))
    loss.backward()
    return loss

  def step():
    loss = fwd_bwd()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  def timed():
    sync()
    t = time.perf_counter()
    loss = step()
    sync()
    dt = time.perf_counter() - t
    losses.append(float(loss))
    return dt

  # Kernels, cuBLAS handles and the allocator warm up on two passes without an update.
  for _ in range(2):
    fwd_bwd()
    model.zero_grad(set_to_none=True)
  sync()
  # The reference computes its projectors on its first step (an SVD per GaLore weight).
  # As on the JAX side (count 1, initial basis), start from step 1 with a valid basis,
  # so the plain steps are timed first and the refresh (possibly slow) comes last.
  for w in galore_params:
    st = opt.state[w]
    st["step"] = 1
    pr = projector_cls(spec["rank"], update_proj_gap=T, scale=spec["galore_scale"], proj_type="std")
    m, n = w.shape
    r = min(spec["rank"], m, n)
    # "std": m >= n projects on the right (rank x n), else on the left (m x rank).
    pr.ortho_matrix = (
      torch.eye(r, n, dtype=w.dtype, device=w.device)
      if m >= n
      else torch.eye(m, r, dtype=w.dtype, device=w.device)
    )
    st["projector"] = pr
  if cuda:
    torch.cuda.reset_peak_memory_stats()
  for _ in range(spec["warmup"]):
    timed()
  times = [timed() for _ in range(spec["steps"])]
  loop_s = None
  if spec["loop_steps"]:
    sync()
    t = time.perf_counter()
    for _ in range(spec["loop_steps"]):
      loss = step()
    sync()
    loop_s = (time.perf_counter() - t) / spec["loop_steps"]
    losses.append(float(loss))
  steady = torch.cuda.max_memory_allocated() if cuda else None
  res.update(step_times_s=times, step_s=median(times), loop_step_s=loop_s, peak_bytes_steady=steady)
  save()
  if spec["refresh_reps"] > 0:
    shapes: dict[tuple, float] = {}
    for w in galore_params:
      if tuple(w.shape) not in shapes:
        a = torch.randn(*w.shape, device=dev, dtype=torch.float32)
        torch.linalg.svd(a, full_matrices=False)  # the reference's call (float32)
        sync()
        t = time.perf_counter()
        torch.linalg.svd(a, full_matrices=False)
        sync()
        shapes[tuple(w.shape)] = time.perf_counter() - t
    total = sum(shapes[tuple(w.shape)] for w in galore_params)
    res["svd_probe"] = {
      "per_shape_s": {"x".join(map(str, k)): v for k, v in shapes.items()},
      "sum_over_leaves_s": total,
    }
    res["refresh_predicted_s"] = res["step_s"] + total
    save()

    def refresh_step(k):
      for st in opt.state.values():
        if "step" in st:
          st["step"] = k * T  # the projector refreshes when step % T == 0
      return timed()

    refresh_reps(
      refresh_step, spec["refresh_reps"], spec["kill_at"], res["refresh_predicted_s"], res, save
    )
  peak = torch.cuda.max_memory_allocated() if cuda else None
  res.update(
    peak_bytes=peak,
    loss_first=losses[0],
    loss_last=losses[-1],
    nonfinite_loss=any(not math.isfinite(x) for x in losses),
  )
