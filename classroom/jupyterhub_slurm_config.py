"""JupyterHub for a labkit class on a Slurm cluster: each student's server is a Slurm job (batchspawner).

Everything of jupyterhub_config.py (authentication, the course environment, the hand-out on first login, the idle
culler) except the spawner and the share: here Slurm gives each job its GPUs (it sets CUDA_VISIBLE_DEVICES) and its
cores, so the hook only copies the hand-out and sets the threads from the job's allocation.

    LABKIT_COURSE=/shared/labkit-course LABKIT_SLURM_PARTITION=gpu LABKIT_SLURM_GPUS=1 \
        /shared/labkit/.venv/bin/jupyterhub -f classroom/jupyterhub_slurm_config.py

The course environment and the course directory must be on a file system every compute node mounts, and the
compute nodes must reach the hub's API: LABKIT_HUB_CONNECT_IP is the head node's address as the nodes see it.

  LABKIT_SLURM_PARTITION  partition (default gpu)      LABKIT_SLURM_GPUS    GPUs per student (default 1; 0 = CPU only)
  LABKIT_SLURM_CPUS       cores per student (default 4) LABKIT_SLURM_MEMORY  memory per student (default 16G)
  LABKIT_SLURM_RUNTIME    wall time of a server (default 4:00:00; the job ends, and the server with it)

Untested here: this repository's tests load this file and check its settings, but no Slurm cluster was at hand.
"""
import os
from pathlib import Path

c = get_config()  # noqa: F821  (JupyterHub provides it)
load_subconfig(str(Path(__file__).resolve().parent / "jupyterhub_config.py"))  # noqa: F821
env = os.environ.get

c.JupyterHub.spawner_class = "batchspawner.SlurmSpawner"
c.JupyterHub.hub_ip = "0.0.0.0"                                    # the servers call the hub from compute nodes
c.JupyterHub.hub_connect_ip = env("LABKIT_HUB_CONNECT_IP", "")     # the head node's address, as the nodes see it
c.Spawner.start_timeout = 600                                      # a job may wait in the queue
c.SlurmSpawner.req_partition = env("LABKIT_SLURM_PARTITION", "gpu")
c.SlurmSpawner.req_nprocs = env("LABKIT_SLURM_CPUS", "4")
c.SlurmSpawner.req_memory = env("LABKIT_SLURM_MEMORY", "16G")
c.SlurmSpawner.req_runtime = env("LABKIT_SLURM_RUNTIME", "4:00:00")
GPUS = int(env("LABKIT_SLURM_GPUS", "1"))
c.SlurmSpawner.req_options = f"--gres=gpu:{GPUS}" if GPUS else ""
# the job script: the threads are the job's cores; Slurm has already set CUDA_VISIBLE_DEVICES
c.SlurmSpawner.batch_script = """#!/bin/bash
#SBATCH --output={{homedir}}/jupyterhub_slurmspawner_%j.log
#SBATCH --job-name=labkit-{{username}}
#SBATCH --chdir={{homedir}}
#SBATCH --export={{keepvars}}
#SBATCH --get-user-env=L
#SBATCH --partition={{partition}}
#SBATCH --time={{runtime}}
#SBATCH --mem={{memory}}
#SBATCH --cpus-per-task={{nprocs}}
{% if options %}#SBATCH {{options}}{% endif %}
export OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK MKL_NUM_THREADS=$SLURM_CPUS_PER_TASK
export LABKIT_STUDENT_THREADS=$SLURM_CPUS_PER_TASK
{{prologue}}
{{cmd}}
{{epilogue}}
"""
RELEASE = Path(env("LABKIT_COURSE")) / "release" if env("LABKIT_COURSE") else None


def slurm_pre_spawn_hook(spawner):
    """The hand-out on first login (as on one server); GPUs, cores and memory come from Slurm."""
    from labkit import classroom

    if RELEASE is not None:
        copied = classroom.give_handout(RELEASE, spawner.user.name)
        spawner.log.info("labkit hand-out for %s: %d new files", spawner.user.name, len(copied))


c.Spawner.pre_spawn_hook = slurm_pre_spawn_hook
