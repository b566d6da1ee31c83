"""tether's sessions: ``nox -l`` lists them, ``nox`` runs them all.

Every session installs the package (not editable: the tests run against what a
user installs) with ``constraints.txt``, which pins the CPU build of torch.
"""

import os
import shutil
import subprocess
from pathlib import Path

import nox

ROOT = Path(__file__).parent
CONSTRAINTS = ("-c", str(ROOT / "constraints.txt"))
GOLDEN_CHECK = ROOT.parent / "shared" / "tools" / "golden_check.py"
TPGM_CHECK = ROOT.parent / "shared" / "tools" / "tpgm_check.py"
#: The backends whose TPGM replays the authors' runs (ALGORITHMS.md §7): all of them.
TPGM_BACKENDS = ("torch", "jax", "keras/tensorflow", "keras/jax", "keras/torch")
KERAS_BACKENDS = ("tensorflow", "jax", "torch")
#: The C kernels of the PyTorch adapter are optional at install; here a missing build fails
#: their tests (TETHER_REQUIRE_KERNELS=0 skips them, for a machine without a C compiler).
KERNELS = {"TETHER_REQUIRE_KERNELS": os.environ.get("TETHER_REQUIRE_KERNELS", "1")}

nox.options.default_venv_backend = "venv"
nox.options.error_on_missing_interpreters = False


def install(session, *extras):
    spec = f".[{','.join(('test', *extras))}]"
    session.install(spec, *CONSTRAINTS)


def golden(session, backend, env=None):
    """Replay the authors' golden trajectories (FTP, SPD; TPGM) when ../shared is beside the checkout."""
    if not GOLDEN_CHECK.exists():
        session.log(f"{GOLDEN_CHECK} not found: golden replay skipped")
        return
    session.run("python", str(GOLDEN_CHECK), backend, env=env)
    label = f"keras/{env['KERAS_BACKEND']}" if backend == "keras" else backend
    if label in TPGM_BACKENDS and TPGM_CHECK.exists():
        session.run("python", str(TPGM_CHECK), backend, env=env)


@nox.session(name="tests-core")
def tests_core(session):
    """The core on NumPy, array_api_strict, jax.numpy under jit and torch under torch.compile; the CLI
    (parity, bench, and a smoke run of robustness)."""
    install(session, "torch", "jax", "flax", "robustness")
    session.run("pytest", "tests/core", "tests/cli", *session.posargs)


@nox.session
def lint(session):
    """ruff check and ruff format --check."""
    session.install("ruff==0.17.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def docs(session):
    """Build the documentation with mkdocs --strict."""
    install(session, "docs")
    site = str(Path(session.create_tmp()) / "site")
    session.run("mkdocs", "build", "--strict", "--site-dir", site, env={"NO_MKDOCS_2_WARNING": "1"})


@nox.session(name="tests-torch")
def tests_torch(session):
    """The PyTorch adapter, then the golden replay."""
    install(session, "torch")
    session.run("pytest", "tests/torch", *session.posargs, env=KERNELS)
    golden(session, "torch")


@nox.session(name="tests-jax")
def tests_jax(session):
    """The optax adapter (with 4 host CPU devices for the sharding test), then the golden replay."""
    install(session, "jax", "torch", "flax")
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    session.run("pytest", "tests/jax", *session.posargs, env=env)
    golden(session, "jax")


@nox.session(name="tests-triton")
def tests_triton(session):
    """The Triton kernels of the PyTorch adapter's CUDA steps, run on CPU tensors by Triton's
    interpreter: float64 against the core, float32 and bfloat16 against the multi-tensor path."""
    install(session, "torch", "triton")
    env = {"TRITON_INTERPRET": "1"}
    tests = ("tests/torch/test_torch_triton.py", "tests/torch/test_torch_reference.py")
    session.run("pytest", *tests, "-k", "triton", *session.posargs, env=env)


def _keras_session(backend):
    extras = {"tensorflow": ("keras", "tensorflow"), "jax": ("keras", "jax"), "torch": ("keras", "torch")}

    def session_fn(session):
        install(session, *extras[backend])
        env = {"KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2"}
        session.run("pytest", "tests/keras", *session.posargs, env=env)
        golden(session, "keras", env=env)

    session_fn.__doc__ = (
        f"The Keras adapter on the {backend} backend (one process per backend), then the golden replay."
    )
    return nox.session(name=f"tests-keras-{backend}")(session_fn)


for _backend in KERAS_BACKENDS:
    globals()[f"tests_keras_{_backend}"] = _keras_session(_backend)


#: The integrations run offline: tiny models built from configs, never a model hub.
INTEGRATIONS_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
    "KERAS_BACKEND": "jax",
    "TF_CPP_MIN_LOG_LEVEL": "2",
}


@nox.session
def integrations(session):
    """The training stacks, offline: the Hugging Face Trainer, PEFT LoRA, Lightning, flax NNX with
    orbax, a JAX 2-D mesh and Keras's distribution API (JAX backend) on 4 host CPU devices."""
    install(session, "integrations")
    session.run("pytest", "tests/integrations", "--timeout=300", *session.posargs, env=INTEGRATIONS_ENV)


@nox.session
def parity(session):
    """`tether parity` on the CPU: every backend against the core's float64 NumPy run."""
    install(session, "all")
    session.run("tether", "parity", "--device", "cpu", *session.posargs)


def _gpu_present():
    smi = shutil.which("nvidia-smi")
    return bool(smi) and subprocess.run([smi, "-L"], capture_output=True, text=True).stdout.strip() != ""


@nox.session(name="parity-gpu")
def parity_gpu(session):
    """`tether parity --device gpu`: on CUDA, with CUDA builds of torch and jax; a no-op without a GPU."""
    if not _gpu_present():
        session.log("parity-gpu: no GPU found (nvidia-smi lists none); nothing to compare on GPU.")
        return
    # no constraints file here: it pins the CPU build of torch
    session.install(".[all]", "jax[cuda12]")
    session.run("tether", "parity", "--device", "gpu", *session.posargs)
