"""Episodes in parallel: the same jobs give the same results, to the last digit, on 1 worker and
on 2 (spawned) worker processes -- down to the evaluation's JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from metarl_ros.core.resources import share_directory
from metarl_ros.evaluation import evaluate, methods, runner
from metarl_ros.evaluation.parallel import run_episodes
from metarl_ros.sim.env_config import load_env_setup

MODELS = share_directory() / "models"
STEPS = 100  # 1 s episodes, the fault at 0.3-0.5 s


def test_results_come_back_in_job_order():
    # built-in functions pickle by reference: the spawned workers import nothing heavy
    seen = []
    jobs = [-3, 1, -4, 1, -5, 9, -2]
    assert run_episodes(abs, jobs, workers=2,
                        progress=lambda d, t: seen.append((d, t))) == [abs(x) for x in jobs]
    assert seen == [(d, 7) for d in range(1, 8)]
    assert run_episodes(abs, jobs, workers=1) == [abs(x) for x in jobs]
    assert run_episodes(abs, [], workers=2) == []


def test_a_failing_job_raises_in_the_caller():
    with pytest.raises(ValueError, match="math domain error"):
        run_episodes(math.sqrt, [4.0, 1.0, -1.0, 9.0], workers=2)
    with pytest.raises(ValueError, match="unknown backend"):
        run_episodes(abs, [1], backend="carrier pigeon")


def short_suite(folder: Path) -> Path:
    """Two conditions (payload, weak motors) x 2 tasks x 1 episode, faults early."""
    data = {
        "name": "short", "family": "test", "description": "a short suite",
        "fault_time_s": {"low": 0.3, "high": 0.5},
        "conditions": {
            "payload": {"scope": "beyond", "description": "4-6 kg",
                        "faults": {"payload": {"mass_kg": {"low": 4.0, "high": 6.0}}}},
            "motor": {"scope": "in_range", "description": "weak",
                      "faults": {"motor": {"joints": [1, 2], "strength": {"low": 0.4,
                                                                           "high": 0.6}}}},
        },
        "draws": {"validation": {"seed": 1, "tasks_per_condition": 2, "episodes_per_task": 1},
                  "report": {"seed": 2, "tasks_per_condition": 2, "episodes_per_task": 1}},
    }
    path = folder / "short.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.skipif(not (MODELS / "pearl" / "model.pt").is_file(), reason="no shipped model")
def test_parallel_evaluation_equals_serial_to_the_last_digit(tmp_path, monkeypatch):
    runs = methods.find_model_runs([MODELS])
    env_config = share_directory() / "sim/envs/iiwa7_compliant.yaml"  # the models' env
    setup = load_env_setup(env_config)
    sets = evaluate.suite_sets(setup, [short_suite(tmp_path)], ["validation"])
    # 4 episodes in chunks of 2: 6 jobs, so each worker runs several, after different ones
    monkeypatch.setattr(runner, "CHUNK", 2)
    names = ["nominal", "pearl_maml", "pd"]
    documents = []
    for workers in (1, 2):
        traces, _ = evaluate.evaluate_sets(sets, runs, names, env_config, workers, steps=STEPS)
        results, _ = evaluate.summarize(sets, traces, names, setup.control_dt, seed=0,
                                        resamples=200)
        documents.append((traces, json.dumps(results, sort_keys=True)))
    (serial, serial_json), (parallel, parallel_json) = documents
    assert serial.keys() == parallel.keys() == {("nominal", 0), ("pearl_maml", 0), ("pd", 0)}
    for key in serial:
        for field in ("error", "effort_sq", "effort_osc", "action_osc"):
            assert np.array_equal(getattr(serial[key], field), getattr(parallel[key], field))
    assert serial_json == parallel_json
    condition = json.loads(serial_json)["validation"]["short"]["conditions"]["payload"]
    assert condition["tasks"] == 2 and condition["episodes"] == 2
    assert set(condition["methods"]) == set(names)
