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
  # A second layer adds its own stages to the program.
  assert rows[1]["lowered_lines"] > rows[0]["lowered_lines"] > 0
