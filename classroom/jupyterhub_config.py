"""JupyterHub for a labkit class on one GPU server: one hub, one Jupyter server per student.

Run it from the course's environment (the one `bash labkit.sh install` made, with `pip install -r
classroom/requirements.txt` on top), so that every student's server and kernel use that same environment:

    sudo LABKIT_COURSE=/srv/labkit-course LABKIT_HUB_STUDENTS=20 \
        /opt/labkit/.venv/bin/jupyterhub -f classroom/jupyterhub_config.py

The choices below are read from environment variables, so one file serves the server, a laptop trial and the test
(tests/test_classroom_hub.py). Every `c.X.y` is JupyterHub's own option; see its configuration reference.

  LABKIT_HUB_AUTH     pam (default: the server's own Unix users and passwords)
                      native (self sign-up with an admin's approval: jupyterhub-nativeauthenticator)
                      dummy (any name, one shared password: for tests and trials only, never for a class)
  LABKIT_HUB_SPAWNER  local (default: each student's server runs as their Unix user, in their home)
                      systemd (the same, inside a systemd unit that enforces mem_limit and cpu_limit:
                               jupyterhub-systemdspawner)
                      simple (every server as the hub's own user, homes under LABKIT_HUB_HOMES: tests only)
  LABKIT_HUB_URL      where the hub listens (default http://127.0.0.1:8000; put a TLS proxy in front, or set
                      https://... with c.JupyterHub.ssl_cert / ssl_key)
  LABKIT_HUB_STUDENTS class size for the shares (default: the roster's length, else 20)
  LABKIT_ROSTER       optional CSV: username[,gpus] (gpus such as 0 or 0;1; empty = round-robin); with pam or
                      native only the roster's users (and admins) may log in
  LABKIT_HUB_ADMINS   comma-separated admin users (the teacher)
  LABKIT_COURSE       the nbgrader course directory `python -m labkit handout DIR` made: its release/ is copied
                      into each student's home on first login (files already there are never overwritten)
  LABKIT_HUB_IDLE     minutes before an idle server is stopped (default 60; 0 = never)
  LABKIT_HUB_STATE    folder for the hub's database, cookie secret and proxy token (default: the working folder)
  LABKIT_GPUS         assume this many GPUs instead of reading them (the test: 2 GPUs on a CPU machine)

A site's own additions (an SSL certificate, an extra service) go in a second file that starts with
`load_subconfig("/path/to/classroom/jupyterhub_config.py")` and is passed to `jupyterhub -f`.
"""
import os
import sys
from pathlib import Path

from labkit import classroom

c = get_config()  # noqa: F821  (JupyterHub provides it)
env = os.environ.get

AUTH = env("LABKIT_HUB_AUTH", "pam")
SPAWNER = env("LABKIT_HUB_SPAWNER", "local")
STATE = Path(env("LABKIT_HUB_STATE", ".")).resolve()
STATE.mkdir(parents=True, exist_ok=True)

# --- where the hub listens, and its own state -------------------------------------------------------------------------
c.JupyterHub.bind_url = env("LABKIT_HUB_URL", "http://127.0.0.1:8000")  # never 0.0.0.0 without TLS in front
c.JupyterHub.db_url = f"sqlite:///{STATE / 'jupyterhub.sqlite'}"
c.JupyterHub.cookie_secret_file = str(STATE / "jupyterhub_cookie_secret")
c.JupyterHub.pid_file = str(STATE / "jupyterhub.pid")
c.ConfigurableHTTPProxy.pid_file = str(STATE / "jupyterhub-proxy.pid")
# the hub and the proxy talk on loopback ports the OS chooses: two hubs on one machine (a trial beside the class's
# hub, or two tests) never collide
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = classroom.free_port()
c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{classroom.free_port()}"
# the proxy from npm: `.ci/install_proxy.sh` puts it in the course environment; else `configurable-http-proxy` on PATH
if classroom.proxy_command():
    c.ConfigurableHTTPProxy.command = [classroom.proxy_command()]

# --- who may log in ---------------------------------------------------------------------------------------------------
ROSTER = classroom.read_roster(env("LABKIT_ROSTER")) if env("LABKIT_ROSTER") else None
ADMINS = {a.strip() for a in env("LABKIT_HUB_ADMINS", "").split(",") if a.strip()}
c.Authenticator.admin_users = ADMINS
if AUTH == "pam":
    c.JupyterHub.authenticator_class = "pam"                  # the server's users; no password is stored by the hub
elif AUTH == "native":
    c.JupyterHub.authenticator_class = "native"               # students sign up; an admin approves at /hub/authorize
    c.NativeAuthenticator.open_signup = False
    c.NativeAuthenticator.minimum_password_length = 10
    c.NativeAuthenticator.check_common_password = True
elif AUTH == "dummy":
    c.JupyterHub.authenticator_class = "dummy"                # tests only: any user name, this password
    c.DummyAuthenticator.password = env("LABKIT_HUB_PASSWORD", "labkit-test")
else:
    raise ValueError(f"LABKIT_HUB_AUTH={AUTH!r}: pass pam, native or dummy")
if ROSTER:
    c.Authenticator.allowed_users = set(ROSTER)               # admins are always allowed
else:
    c.Authenticator.allow_all = True                          # anyone who can log in (pam: any user of the server)

# --- the students' servers: the course environment, JupyterLab --------------------------------------------------------
BIN = Path(sys.executable).parent
c.Spawner.cmd = [str(BIN / "jupyterhub-singleuser")]          # the same environment as the hub: labkit, torch, ...
c.Spawner.default_url = "/lab"
c.Spawner.environment = {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
c.Spawner.start_timeout = 120                                 # a busy server starts slowly
c.Spawner.http_timeout = 120
if SPAWNER == "local":
    c.JupyterHub.spawner_class = "localprocess"
elif SPAWNER == "systemd":
    c.JupyterHub.spawner_class = "systemdspawner.SystemdSpawner"
    c.SystemdSpawner.isolate_tmp = True                       # each student their own /tmp (labkit's stores live there)
    c.SystemdSpawner.unit_name_template = "jupyter-labkit-{USERNAME}"
elif SPAWNER == "simple":
    c.JupyterHub.spawner_class = "simple"                     # tests only: no isolation between users
    c.SimpleLocalProcessSpawner.home_dir_template = str(Path(env("LABKIT_HUB_HOMES", "/tmp/labkit-homes"))
                                                        / "{username}")
    if os.geteuid() == 0:
        c.Spawner.args = ["--allow-root"]                     # the servers run as the hub's user: root in a container
else:
    raise ValueError(f"LABKIT_HUB_SPAWNER={SPAWNER!r}: pass local, systemd or simple")

# --- each student's share of the machine ------------------------------------------------------------------------------
N_GPUS = int(env("LABKIT_GPUS")) if env("LABKIT_GPUS") else None
MACHINE = classroom.read_machine(gpus=N_GPUS)
STUDENTS = int(env("LABKIT_HUB_STUDENTS") or (len(ROSTER) if ROSTER else 20))
SHARES = {s.student: s for s in classroom.shares(STUDENTS, MACHINE, ROSTER)} if ROSTER else {}
PLAN_EACH = classroom.share_for(0, STUDENTS, MACHINE)
# mem_limit and cpu_limit: enforced by systemdspawner (and dockerspawner, kubespawner); the local process spawners
# only pass them on as MEM_LIMIT and CPU_LIMIT (JupyterHub's Spawner.mem_limit documentation)
c.Spawner.mem_limit = PLAN_EACH.mem_limit
c.Spawner.cpu_limit = PLAN_EACH.cpu_limit
RELEASE = Path(env("LABKIT_COURSE")) / "release" if env("LABKIT_COURSE") else None


def pre_spawn_hook(spawner):
    """Before a student's server starts: their GPUs and threads, and the labs in their home the first time."""
    name = spawner.user.name
    share = SHARES.get(name) or classroom.share_for(spawner.user.id - 1, STUDENTS, MACHINE, name)
    spawner.environment.update(classroom.spawner_environment(share))
    spawner.log.info("labkit share for %s: GPUs %s (shared by %s), %s threads", name, share.gpus or "none",
                     share.gpu_shared_with, share.threads)
    if RELEASE is not None:  # the simple spawner has a folder per user name; the others, the Unix user's home
        home = spawner.home_dir if hasattr(spawner, "home_dir_template") else None
        copied = classroom.give_handout(RELEASE, name, home)
        spawner.log.info("labkit hand-out for %s: %d new files", name, len(copied))


c.Spawner.pre_spawn_hook = pre_spawn_hook

# --- stop idle servers (jupyterhub-idle-culler), so a class's forgotten kernels give their memory back ----------------
IDLE = int(env("LABKIT_HUB_IDLE", "60"))
try:
    import jupyterhub_idle_culler  # noqa: F401
except ImportError:
    jupyterhub_idle_culler = None
if IDLE > 0 and jupyterhub_idle_culler is not None:
    c.JupyterHub.load_roles = [{"name": "idle-culler", "services": ["idle-culler"],
                                "scopes": ["list:users", "read:users:activity", "read:servers", "delete:servers"]}]
    c.JupyterHub.services = [{"name": "idle-culler",
                              "command": [sys.executable, "-m", "jupyterhub_idle_culler", f"--timeout={IDLE * 60}"]}]

# A site's or a test's additions go in their own file that starts with load_subconfig("<this file>") (traitlets).
