"""Lab 08's workers on a GPU machine, shown on the CPU (issue 25, finding 8).

The GPU count is monkeypatched; the workers are real processes and run their (CPU-only) trials. What is checked
is the plan the runner makes: a trial that declares no GPU gets as many CPU workers as asked whatever GPUs the
machine has, and a GPU trial's worker ``i`` sees the ``i``-th GPU of the parent's ``CUDA_VISIBLE_DEVICES`` list."""
from __future__ import annotations

import pytest

from labkit._validate import ArgumentError
from labkit.ablation import runner
from labkit.ablation.study import Study

TRIAL = '''
import os
def trial(config, seed):
    return {"accuracy": 0.5 + 0.01 * seed, "gpu": os.environ.get("CUDA_VISIBLE_DEVICES")}

def gpu_trial(config, seed):
    return {"accuracy": 0.5 + 0.01 * seed, "gpu": os.environ.get("CUDA_VISIBLE_DEVICES")}
gpu_trial.uses_gpu = True
'''


@pytest.fixture()
def trials(trial_module, monkeypatch):
    monkeypatch.setenv("LABKIT_NO_PROGRESS", "1")
    return trial_module("gpu_flag_trial", TRIAL)


@pytest.fixture()
def spawned(monkeypatch):
    """The device each started worker was given (its CUDA_VISIBLE_DEVICES, None for a CPU worker); the worker
    itself starts without one, so that its trial runs here on the CPU."""
    seen: list = []
    real = runner._Worker.__init__

    def init(self, slot, db, payload, gpu):
        seen.append(gpu)
        real(self, slot, db, payload, None)

    monkeypatch.setattr(runner._Worker, "__init__", init)
    return seen


def _study(fn, seeds=(0, 1)):
    return Study(name="g", baseline={"x": 1}, factors={"x": [2]}, seeds=list(seeds), trial=fn)  # 2 x len(seeds)


def test_a_cpu_trial_is_not_capped_at_the_gpu_count(tmp_path, trials, spawned, monkeypatch):
    monkeypatch.setattr(runner, "_gpus", lambda: 1)  # a one-GPU server: it used to get one worker
    out = runner.run_study(_study(trials.trial), tmp_path / "a.db", workers=2, echo=False, progress=False)
    assert (out.workers, out.device, out.done) == (2, "cpu", 4)
    assert spawned == [None, None]
    assert runner.default_workers() == runner.default_workers(gpu=False) >= 1


def test_gpu_workers_take_the_parents_visible_list(tmp_path, trials, spawned, monkeypatch):
    monkeypatch.setattr(runner, "_gpus", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    out = runner.run_study(_study(trials.gpu_trial), tmp_path / "b.db", workers=4, echo=False, progress=False)
    assert (out.workers, out.device, out.done) == (2, "gpu", 4)   # one worker per GPU, not 4
    assert spawned == ["2", "3"]


def test_gpus_argument_overrides_the_trial(tmp_path, trials, spawned, monkeypatch, capsys):
    monkeypatch.setattr(runner, "_gpus", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    out = runner.run_study(_study(trials.trial, seeds=(0,)), tmp_path / "c.db", workers=3, gpus=True,
                           progress=False)
    assert (out.workers, out.device) == (2, "gpu") and spawned == ["0", "1"]
    assert "2 GPU worker(s) (CUDA_VISIBLE_DEVICES 0, 1)" in capsys.readouterr().out
    spawned.clear()
    out = runner.run_study(_study(trials.gpu_trial, seeds=(0,)), tmp_path / "d.db", workers=2, gpus=False,
                           echo=False, progress=False)
    assert (out.workers, out.device) == (2, "cpu") and spawned == [None, None]
    with pytest.raises(ArgumentError, match="gpus must be True"):
        runner.run_study(_study(trials.trial), tmp_path / "e.db", gpus="yes", echo=False)


def test_a_gpu_trial_without_a_gpu_runs_on_cpu_workers_and_says_so(tmp_path, trials, spawned, monkeypatch, capsys):
    monkeypatch.setattr(runner, "_gpus", lambda: 0)
    out = runner.run_study(_study(trials.gpu_trial, seeds=(0,)), tmp_path / "f.db", workers=2, progress=False)
    assert (out.workers, out.device) == (2, "cpu") and spawned == [None, None]
    assert "the trial asks for a GPU, but none is visible here" in capsys.readouterr().out


def test_gpu_slots(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert runner.gpu_slots(3) == ["0", "1", "2"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert runner.gpu_slots(2) == ["2", "3"] and runner.gpu_slots(1) == ["2"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-8f1c, MIG-4b2e")  # UUIDs and MIG names pass through as given
    assert runner.gpu_slots(2) == ["GPU-8f1c", "MIG-4b2e"]
    monkeypatch.setattr(runner, "_gpus", lambda: 8)
    assert runner.default_workers(gpu=True) == 8
    assert runner.uses_gpu(lambda c, s: None) is False
