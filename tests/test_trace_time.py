"""experiments/trace_time.py: trace and lower the trainer's step on abstract inputs."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

import trace_time  # noqa: E402


def test_reports_trace_and_lower_times_per_layer_count(capsys):
  assert trace_time.main(["--model", "llama_tiny", "--rank", "32", "--vocab", "512",
                          "--layers", "1,2"]) == 0  # fmt: skip
  rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [r["layers"] for r in rows] == [1, 2]
  for r in rows:
    assert r["optimizer"] == "galore_adamw8bit" and r["trace_s"] > 0 and r["lower_s"] > 0
    assert r["refresh"] == "scheduled" and "compile_s" not in r
  # A second layer adds its own stages to the program.
  assert rows[1]["lowered_lines"] > rows[0]["lowered_lines"] > 0


def test_compile_times_give_the_seconds_each_layer_adds(capsys):
  # (Plain AdamW, which compiles fastest: the fit is what is tested.)
  assert trace_time.main(["--model", "llama_tiny", "--optimizer", "adamw", "--vocab", "512",
                          "--layers", "1,2", "--compile", "--refresh", "not_due"]) == 0  # fmt: skip
  *rows, fit = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [(r["layers"], r["refresh"]) for r in rows] == [(1, "not_due"), (2, "not_due")]
  assert all(r["compile_s"] > 0 for r in rows)
  # Two counts: the line through them, predicted at llama_tiny's own 4 layers.
  slope = rows[1]["compile_s"] - rows[0]["compile_s"]
  assert fit["layers_measured"] == [1, 2] and fit["model_layers"] == 4
  assert abs(fit["compile_s_per_layer"] - slope) < 0.01
  assert abs(fit["compile_s_predicted"] - (rows[1]["compile_s"] + 2 * slope)) < 0.1
