"""The README's "In your own Flax model" examples run as written; its contents list and
in-page links match its headings."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _section_blocks(heading: str) -> list[str]:
  """The python blocks of the README section under ``heading`` (up to the next heading)."""
  text = README.read_text()
  start = text.index(heading) + len(heading)
  end = re.search(r"^#{2,3} ", text[start:], flags=re.M)
  section = text[start : start + end.start()] if end else text[start:]
  return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_own_model_examples_run():
  blocks = _section_blocks("### In your own Flax model")
  assert len(blocks) == 3  # the loop, the parameter groups, inject_hyperparams
  namespace: dict = {}
  for block in blocks:  # later blocks reuse the model and step of the first
    exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - our own README
  assert float(namespace["state"].hyperparams["learning_rate"]) == pytest.approx(3e-3)
  # The parameter-group optimizer projected q (rank 4) and the MLP (rank 8), not the biases.
  opt_state = namespace["optimizer"].opt_state[0].inner_states
  assert opt_state["attn"].inner_state.projectors["q_proj"]["kernel"].shape == (4, 16)
  assert opt_state["mlp"].inner_state.projectors["up_proj"]["kernel"].shape == (16, 8)


def test_ci_runs_the_readme_test_command():
  # README promises that `.ci/run` runs its second line verbatim; the two drift apart
  # silently otherwise (e.g. the pytest worker flags).
  first_block = re.search(r"```bash\n(.*?)```", README.read_text(), flags=re.S).group(1)
  test_command = first_block.splitlines()[1]
  ci = (README.parent / ".ci" / "run").read_text().splitlines()
  assert test_command in ci, test_command


def _outside_code(text: str) -> str:
  return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def _slug(heading: str) -> str:
  """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
  return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_contents_and_links_match_its_headings():
  # The contents list names every section and subsection, in order, and every in-page
  # link lands on a heading (renaming a section without its links fails here).
  text = _outside_code(README.read_text())
  headings = re.findall(r"^(#{1,6}) (.+)$", text, flags=re.M)
  anchors = {_slug(h) for _, h in headings}
  links = re.findall(r"\]\(#([^)]+)\)", text)
  assert len(links) > 15 and sorted(set(links) - anchors) == []
  contents = text[text.index("**Contents**") : text.index("\n## ")]
  listed = re.findall(r"^( *)- \[(.+)\]\(#(.+)\)$", contents, flags=re.M)
  sections = [(len(level), h) for level, h in headings if len(level) in (2, 3)]
  assert [(2 + len(indent) // 2, h) for indent, h, _ in listed] == sections
  assert all(_slug(h) == anchor for _, h, anchor in listed)


def test_host_decided_refresh_example_trains_as_the_scheduled_transform():
  """The optimizer section's two-step loop (refresh="due" / "not_due") gives the parameters
  of the one scheduled transform on the same batches (count 0 refreshes, the rest do not)."""
  import jax
  import jax.numpy as jnp
  import optax

  import galore_jax

  (block,) = [b for b in _section_blocks("## The optimizer") if "refresh_due" in b]
  # Gradients of full rank with distinct singular values: a rank-deficient one's null-space
  # singular vectors are arbitrary, and differ between a jitted and an eager SVD.
  params = {"w": jnp.ones((256, 160)) / 16, "b": jnp.zeros((160,))}
  batches = [jax.random.normal(jax.random.key(i), (256, 256)) for i in range(5)]
  loss_fn = lambda p, x: jnp.sum(jnp.square(x @ p["w"] + p["b"] - 1.0))
  # (a copy: the example's step donates the params it is given)
  namespace = {"params": jax.tree.map(jnp.copy, params), "batches": batches, "loss_fn": loss_fn}
  exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - our own README
  tx = galore_jax.galore_adamw(1e-3, rank=128, update_proj_gap=200)
  state, want = tx.init(params), params
  for x in batches:
    updates, state = tx.update(jax.grad(loss_fn)(want, x), state, want)
    want = optax.apply_updates(want, updates)
  assert int(galore_jax.galore_count(namespace["state"])) == 5
  for name in want:
    assert jnp.allclose(namespace["params"][name], want[name], rtol=1e-5, atol=1e-6), name
