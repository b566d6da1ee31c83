"""The backends that `tether parity` and `tether bench` run, each in a subprocess of its own.

`KERAS_BACKEND` is fixed when Keras is imported, so every backend runs in its
own process (`python -m tether COMMAND --worker BACKEND …`), which streams its
results back to the parent as JSON lines prefixed with `@@`.
"""

import importlib.util
import json
import os
import subprocess
import sys

#: Backend name -> (the modules it needs, its extra environment).
BACKENDS = {
    "torch": (("torch",), {}),
    "jax": (("jax", "optax"), {}),
    "keras/tensorflow": (("keras", "tensorflow"), {"KERAS_BACKEND": "tensorflow"}),
    "keras/jax": (("keras", "jax"), {"KERAS_BACKEND": "jax"}),
    "keras/torch": (("keras", "torch"), {"KERAS_BACKEND": "torch"}),
}
#: Device names that mean a GPU (torch says "cuda", the others "gpu").
GPU_NAMES = ("cuda", "gpu")


def installed(backend):
    """Whether every module the backend needs can be imported."""
    return all(importlib.util.find_spec(m) is not None for m in BACKENDS[backend][0])


def module_name(command, backend):
    """The worker module of a command for a backend: `tether._parity_keras` for keras/jax, say."""
    return f"tether._{command}_{backend.split('/')[0]}"


def wanted(device, device_filter):
    """Whether `device` is among `cpu`, `gpu` or `all`."""
    return device_filter == "all" or (device_filter == "gpu") == (device in GPU_NAMES)


def emit(obj):
    """Send one result from a worker to its parent."""
    print("@@" + json.dumps(obj), flush=True)


def run_worker(backend, args, on_result):
    """Run `python -m tether *args` for `backend`; call `on_result` with each result as it arrives.

    Returns the exit status and the last lines the worker printed besides its results.
    """
    env = {**os.environ, **BACKENDS[backend][1], "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "tether", *args]
    other = []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    for line in proc.stdout:
        if line.startswith("@@"):
            on_result(json.loads(line[2:]))
        else:
            other.append(line)
    return proc.wait(), "".join(other[-20:]).rstrip()


def devices(backend):
    """The devices a backend sees: the CPU, and its GPU where it has one (torch calls it "cuda")."""
    family, keras_backend = backend.split("/")[0], BACKENDS[backend][1].get("KERAS_BACKEND")
    if family == "torch" or keras_backend == "torch":
        import torch

        gpu = torch.cuda.is_available()
    elif family == "jax" or keras_backend == "jax":
        import jax

        gpu = any(d.platform == "gpu" for d in jax.devices())
    else:
        import tensorflow as tf

        gpu = bool(tf.config.list_physical_devices("GPU"))
    return ["cpu"] + ([("cuda" if family == "torch" else "gpu")] if gpu else [])
