"""Two gloo ranks on the CPU (``torch_dist_child.py``) against one process, in float64.

FSDP2 and ``distribute_tensor`` (DTensors, whose per-tensor sums are finished across the
ranks), DDP and ``ZeroRedundancyOptimizer`` (whole tensors on each rank) equal a single-process
run at 1e-12; a ``torch.distributed.checkpoint`` save, loaded by fresh processes into a fresh
model and optimizer, continues bit for bit; FSDP1's flattened parameters are refused.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch_helpers import BUILDERS, assert_bitwise_equal

HERE = Path(__file__).parent
WORLD = 2
#: Seconds for one phase of the two ranks (each phase starts two Python processes).
TIMEOUT = 300

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)


def launch(phase, folder):
    """Run ``phase`` of the child on 2 ranks; fail with both ranks' output if either fails or hangs."""
    store = folder / f"rendezvous-{phase}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if sys.platform == "linux":  # gloo finds the loopback device by name, not by a hostname lookup
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    command = [sys.executable, str(HERE / "torch_dist_child.py"), phase]
    ranks = [
        subprocess.Popen(
            [*command, str(rank), str(WORLD), str(store), str(folder)],
            cwd=HERE,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(WORLD)
    ]
    outputs = []
    try:
        for rank in ranks:
            outputs.append(rank.communicate(timeout=TIMEOUT)[0])
    except subprocess.TimeoutExpired:
        for rank in ranks:
            rank.kill()
        pytest.fail(f"the {phase} ranks ran past {TIMEOUT} s")
    if any(rank.returncode for rank in ranks):
        pytest.fail(f"the {phase} ranks failed:\n" + "\n".join(outputs))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("distributed")


@pytest.fixture(scope="module")
def parity(folder):
    launch("parity", folder)
    return torch.load(folder / "parity.pt", weights_only=False), torch.load(folder / "fsdp1.pt")


@pytest.fixture(scope="module")
def resumed(folder):
    """The uninterrupted and the resumed runs' shards on each rank, by (mode, kind)."""
    launch("save", folder)
    launch("load", folder)
    load = lambda name: torch.load(folder / name, weights_only=True)  # noqa: E731
    return {
        (mode, kind): [
            (load(f"{mode}-{kind}-{rank}.expected.pt"), load(f"{mode}-{kind}-{rank}.resumed.pt"))
            for rank in range(WORLD)
        ]
        for mode in ("ddp", "fsdp2")
        for kind in BUILDERS
    }


def _assert_parity(parity, case):
    got, expected, start = parity[0]["runs"][case]
    if isinstance(got, str):
        pytest.fail(f"the distributed run raised:\n{got}")
    assert len(got) == len(expected) == len(start)
    for a, b, a0 in zip(got, expected, start, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        assert not torch.allclose(b, a0, rtol=0, atol=1e-6)  # every tensor moved: the steps did something


@pytest.mark.parametrize("path", ["cpu", "accelerator"])
@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_fsdp2_equals_one_process(parity, kind, path):
    _assert_parity(parity, ("fsdp2", kind, path))


#: All-reduces per step of the FSDP2 model (an anchored group, an unanchored one): FTP sums
#: (∇γ and the split rows' norms) and takes max n, SPD sums its three statistics, MARS-SP its
#: split rows' norms, L2-SP has no statistics.
COLLECTIVES = {"AdamFTP": 2, "SGDFTP": 2, "FTP": 2, "AdamSPD": 1, "SPD": 1, "MARSSP": 1, "L2SP": 0}


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_a_step_makes_a_few_collectives_whatever_the_number_of_tensors(parity, kind):
    """Seven sharded tensors in the anchored group: one all-reduce per statistic, not one per tensor."""
    assert parity[0]["collectives"][kind] == [COLLECTIVES[kind]] * len(parity[0]["collectives"][kind])
    assert len(parity[0]["collectives"][kind]) > 1


@pytest.mark.parametrize("path", ["cpu", "accelerator"])
@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_distributed_tensors_equal_one_process(parity, kind, path):
    """Rows split (unevenly, one shard empty), columns split, a vector split, replicated tensors."""
    _assert_parity(parity, ("dtensor", kind, path))


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_ddp_equals_one_process(parity, kind):
    _assert_parity(parity, ("ddp", kind, "cpu"))


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_zero_redundancy_optimizer_equals_one_process(parity, kind):
    _assert_parity(parity, ("zero", kind, "cpu"))


@pytest.mark.parametrize("name", ["fsdp2", "zero"])
def test_the_pages_snippets_equal_one_process(parity, name):
    """docs/scale.md's snippets, run on 2 ranks, and in one process with their distributed pieces
    taken out (the model itself for ``fully_shard`` and DDP, the class for ZeRO)."""
    _assert_parity(parity, ("docs", name, "cpu"))


def test_a_state_dict_of_plain_tensors_is_refused_for_dtensor_parameters_and_the_reverse(parity):
    if isinstance(parity[0]["refusal"], str):
        pytest.fail(f"the distributed run raised:\n{parity[0]['refusal']}")
    plain_into_sharded, sharded_into_plain = parity[0]["refusal"]
    assert plain_into_sharded is not None, "plain tensors were loaded as DTensor parameters' state"
    assert "is a plain tensor" in plain_into_sharded and "torch.distributed.checkpoint" in plain_into_sharded
    assert sharded_into_plain is not None, "DTensors were loaded as plain parameters' state"
    assert "is a DTensor" in sharded_into_plain


@pytest.mark.parametrize("use_orig_params", [False, True])
@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_fsdp1_flat_parameters_are_refused(parity, kind, use_orig_params):
    message = parity[1][kind, use_orig_params]
    assert message is not None, "FSDP1's flattened parameters were taken"
    assert "FSDP1" in message and "fully_shard" in message


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_distributed_checkpoint_resumes_bit_for_bit(resumed, mode, kind):
    for expected, got in resumed[mode, kind]:
        assert_bitwise_equal(expected, got)
