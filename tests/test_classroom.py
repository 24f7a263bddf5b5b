"""The classroom without a hub: shares of the machine, the plan, the roster, the hand-out copy, the memory
measurement, and the hub's configuration files loaded (and their spawner hook run) as JupyterHub would."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from labkit import classroom as C

REPO = Path(__file__).resolve().parent.parent
GIB = 1 << 30


def machine(gpus=0, cpus=32, memory_gib=256):
    return C.read_machine(gpus=gpus, cpus=cpus, memory_gib=memory_gib)


def test_fewer_gpus_than_students_round_robin_and_counted():
    sh = C.shares(20, machine(gpus=8))
    per_gpu = {g: sum(1 for s in sh if s.gpus == [g]) for g in range(8)}
    assert per_gpu == {0: 3, 1: 3, 2: 3, 3: 3, 4: 2, 5: 2, 6: 2, 7: 2}
    assert all(s.gpu_shared_with == per_gpu[s.gpus[0]] for s in sh)
    assert all(s.nccl_ranks == 0 for s in sh)          # a shared GPU: multi-rank labs on gloo
    assert all(s.threads == 1 and s.cpu_limit == 1.6 for s in sh)
    assert sum(s.mem_limit for s in sh) <= 256 * GIB * (1 - C.SYSTEM_RESERVE)


def test_more_gpus_than_students_gives_each_their_own_block():
    sh = C.shares(3, machine(gpus=8))
    assert [s.gpus for s in sh] == [[0, 1], [2, 3], [4, 5]]
    assert all(s.gpu_shared_with == 1 and s.nccl_ranks == 2 for s in sh)
    one = C.shares(8, machine(gpus=8))
    assert [s.gpus for s in one] == [[i] for i in range(8)] and all(s.nccl_ranks == 0 for s in one)


def test_no_gpu_and_bad_input():
    s = C.share_for(0, 5, machine())
    assert s.gpus == [] and s.gpu_shared_with == 0 and C.spawner_environment(s)["CUDA_VISIBLE_DEVICES"] == ""
    with pytest.raises(ValueError, match="n_students=0"):
        C.share_for(0, 0, machine())
    with pytest.raises(ValueError, match=r"gpus=\[9\] for ann.*GPUs 0..1"):
        C.share_for(0, 2, machine(gpus=2), "ann", gpus=[9])
    with pytest.raises(ValueError, match="gpus=-1"):
        C.read_machine(gpus=-1)


def test_roster_gpus_and_errors(tmp_path):
    p = tmp_path / "roster.csv"
    p.write_text("username,gpus\nann,0;1\nben,\ncy,2\ndee,\n")
    roster = C.read_roster(p)
    assert roster == {"ann": [0, 1], "ben": None, "cy": [2], "dee": None}
    sh = {s.student: s for s in C.shares(0, machine(gpus=4), roster)}
    assert sh["ann"].gpus == [0, 1] and sh["cy"].gpus == [2]
    assert sh["ben"].gpus == [1] and sh["dee"].gpus == [3]        # round-robin by position where not named
    assert sh["ann"].gpu_shared_with == 2 and sh["ann"].nccl_ranks == 0  # ben shares GPU 1 with ann
    assert sh["dee"].gpu_shared_with == 1
    for text, msg in [("name\nann\n", "'username' column"), ("username\nann\nann\n", "'ann' appears twice"),
                      ("username,gpus\nann,x\n", r"gpus='x' for ann"), ("username\n\n,\n", "empty username")]:
        p.write_text(text)
        with pytest.raises(ValueError, match=msg):
            C.read_roster(p)


def test_plan_for_a_class_larger_than_the_machine_says_what_is_shared():
    needs = {"labs": {"00_start_here": {"peak_pss": 2 * GIB, "peak_rss": 3 * GIB, "peak_processes": 5},
                      "01_collectives": {"peak_pss": GIB // 2, "peak_rss": GIB, "peak_processes": 9}},
             "measured_on": "test"}
    p = C.plan(200, machine(gpus=2, cpus=16, memory_gib=64), needs)
    rows = {r["lab"]: r for r in p["labs"]}
    assert not rows["00_start_here"]["fits_all"] and rows["00_start_here"]["students_at_once"] == 28  # 57.6 GiB / 2
    assert rows["01_collectives"]["ranks"] == 8
    text = C.format_plan(p)
    assert "200 students on 2 GPUs: up to 100 students per GPU" in text
    assert "200 students on 16 cores" in text and "00_start_here fits 28 of 200 at once" in text
    assert text.count("\n") < 40, "a big class is summarised, not listed in full"
    assert "no GPU" in C.format_plan(C.plan(2, machine(), needs))


def test_plan_command_reads_this_machine_and_the_shipped_measurements():
    out = subprocess.run([sys.executable, "-m", "labkit", "classroom", "plan", "--students", "3", "--gpus", "4",
                          "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert [s["gpus"] for s in doc["shares"]] == [[0], [1], [2]] and doc["machine"]["cpus"] >= 1
    assert {r["lab"] for r in doc["labs"]} >= {"00_start_here", "04_pipeline"}, "measured needs ship with labkit"
    text = subprocess.run([sys.executable, "-m", "labkit", "classroom", "plan", "--students", "25"],
                          capture_output=True, text=True, timeout=120)
    assert text.returncode == 0 and "Host memory each lab needs" in text.stdout and "student25" in text.stdout
    bad = subprocess.run([sys.executable, "-m", "labkit", "classroom", "plan"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "--students N or --roster FILE" in bad.stderr


def test_copy_handout_never_overwrites_a_students_work(tmp_path):
    release, home = tmp_path / "release", tmp_path / "home"
    (release / "00_start_here").mkdir(parents=True)
    (release / "00_start_here" / "00_start_here.ipynb").write_text("fresh")
    (release / "01_collectives").mkdir()
    (release / "01_collectives" / "01_collectives.ipynb").write_text("fresh")
    (home / "00_start_here").mkdir(parents=True)
    (home / "00_start_here" / "00_start_here.ipynb").write_text("my work")
    copied = C.copy_handout(release, home)
    assert copied == [home / "01_collectives" / "01_collectives.ipynb"]
    assert (home / "00_start_here" / "00_start_here.ipynb").read_text() == "my work"
    assert C.copy_handout(release, home) == []
    with pytest.raises(FileNotFoundError, match="labkit handout"):
        C.copy_handout(tmp_path / "nothing", home)


def test_measure_sees_the_kernel_and_the_processes_it_starts(tmp_path):
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    nb = new_notebook(cells=[
        new_code_cell("import numpy as np, subprocess, sys, time\nblock = np.ones(300 * 2**20 // 8)  # 300 MiB"),
        new_code_cell("p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(1.5)'])\np.wait()"),
    ])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = tmp_path / "tiny.ipynb"
    nbformat.write(nb, str(path))
    got = C.measure([path], interval=0.05)["tiny"]
    assert min(got["peak_rss"], got["peak_pss"]) > 300 * 2**20 and got["peak_processes"] >= 2, got


def test_shipped_measurements_cover_every_notebook():
    doc = C.lab_memory()
    stems = {p.stem for p in (REPO / "notebooks").glob("[0-9][0-9]_*.ipynb")}
    assert set(doc["labs"]) == stems, "run python -m labkit classroom measure after adding a notebook"
    assert all(min(v["peak_rss"], v["peak_pss"]) > 100 * 2**20 and v["peak_processes"] >= 1
               for v in doc["labs"].values())


# --- the hub's configuration, loaded as JupyterHub loads it -----------------------------------------------------------

def _load(path: Path, monkeypatch, **env):
    from traitlets.config.loader import PyFileConfigLoader

    for k in list(__import__("os").environ):
        if k.startswith("LABKIT_HUB_") or k in ("LABKIT_ROSTER", "LABKIT_COURSE", "LABKIT_GPUS"):
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, str(v))
    return PyFileConfigLoader(path.name, str(path.parent)).load_config()


def test_hub_config_choices_and_errors(tmp_path, monkeypatch):
    cfg_path = REPO / "classroom" / "jupyterhub_config.py"
    c = _load(cfg_path, monkeypatch, LABKIT_HUB_STATE=tmp_path)
    assert c.JupyterHub.authenticator_class == "pam" and c.JupyterHub.spawner_class == "localprocess"
    assert c.JupyterHub.bind_url == "http://127.0.0.1:8000" and c.Authenticator.allow_all is True
    roster = tmp_path / "roster.csv"
    roster.write_text("username,gpus\nann,\nben,\n")
    c = _load(cfg_path, monkeypatch, LABKIT_HUB_STATE=tmp_path, LABKIT_HUB_AUTH="native",
              LABKIT_HUB_SPAWNER="systemd", LABKIT_ROSTER=roster, LABKIT_HUB_ADMINS="teach")
    assert c.JupyterHub.authenticator_class == "native" and c.NativeAuthenticator.open_signup is False
    assert c.JupyterHub.spawner_class == "systemdspawner.SystemdSpawner"
    assert c.Authenticator.allowed_users == {"ann", "ben"} and c.Authenticator.admin_users == {"teach"}
    assert c.Spawner.mem_limit > 0 and c.Spawner.cpu_limit > 0
    for var, value in [("LABKIT_HUB_AUTH", "ldap"), ("LABKIT_HUB_SPAWNER", "docker")]:
        with pytest.raises(ValueError, match=f"{var}='{value}'"):
            _load(cfg_path, monkeypatch, LABKIT_HUB_STATE=tmp_path, **{var: value})


def test_hub_spawner_hook_sets_the_share_and_copies_the_handout(tmp_path, monkeypatch):
    release = tmp_path / "course" / "release" / "00_start_here"
    release.mkdir(parents=True)
    (release / "00_start_here.ipynb").write_text("{}")
    c = _load(REPO / "classroom" / "jupyterhub_config.py", monkeypatch, LABKIT_HUB_STATE=tmp_path,
              LABKIT_HUB_AUTH="dummy", LABKIT_HUB_SPAWNER="simple", LABKIT_HUB_STUDENTS=3, LABKIT_GPUS=2,
              LABKIT_COURSE=tmp_path / "course", LABKIT_HUB_HOMES=tmp_path / "homes")
    envs = {}
    for uid, name in [(1, "ann"), (2, "ben"), (3, "cy")]:
        home = tmp_path / "homes" / name
        spawner = SimpleNamespace(user=SimpleNamespace(name=name, id=uid), environment={},
                                  log=logging.getLogger("test"), home_dir_template="", home_dir=str(home))
        c.Spawner.pre_spawn_hook(spawner)
        envs[name] = spawner.environment
        assert (home / "00_start_here" / "00_start_here.ipynb").is_file()
    assert [envs[n]["CUDA_VISIBLE_DEVICES"] for n in ("ann", "ben", "cy")] == ["0", "1", "0"]
    assert json.loads(envs["cy"]["LABKIT_SHARE"])["gpu_shared_with"] == 2


def test_slurm_config_builds_on_the_server_config(tmp_path, monkeypatch):
    c = _load(REPO / "classroom" / "jupyterhub_slurm_config.py", monkeypatch, LABKIT_HUB_STATE=tmp_path,
              LABKIT_SLURM_GPUS=2)
    assert c.JupyterHub.spawner_class == "batchspawner.SlurmSpawner" and c.JupyterHub.hub_ip == "0.0.0.0"
    assert c.SlurmSpawner.req_options == "--gres=gpu:2" and "OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK" in \
        c.SlurmSpawner.batch_script
    assert c.JupyterHub.authenticator_class == "pam"           # the rest comes from jupyterhub_config.py
    assert c.Spawner.pre_spawn_hook.__name__ == "slurm_pre_spawn_hook"
