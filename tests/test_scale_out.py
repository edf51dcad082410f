"""Scale out (notebook 09, helpers.train): a real 2-process run on this CPU (gloo) with rank 0 alone writing, a
killed 2-process run resuming, the launcher configs and the big profiles, the memory calculator. (A 2-process run
against a 1-process one is notebook 09's self-check, run by the notebook chain test.)"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from helpers import ROOT
from helpers.launch import launch_command, rank_lines
from helpers.memory import (
    LLAMA31,
    accelerate_estimate,
    estimate,
    fewest_gpus,
    fits,
    launcher_settings,
    parameter_counts,
    profile_estimate,
)
from helpers.profiles import list_profiles, load_profile
from helpers.runfolder import RunFolder
from helpers.serve import free_port
from helpers.steps import CHECKPOINTS, TRAIN
from helpers.train import RESULT_PREFIX, UnsupportedSetupError, check_stack, parse_overrides

sys.path.insert(0, str(Path(__file__).parent))
from scale_out_setup import prepare_run  # noqa: E402

CONFIGS = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))
STEPS = 3
# Same rows per step, same seed, fp32: a resumed run and an unbroken one differ at most in summation order, which
# moves fp32 losses by ~1e-6.
LOSS_TOLERANCE = 1e-4  # relative


def _env(runs: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "LLM_SCHOOL_RUNS": str(runs), "OMP_NUM_THREADS": "1"}


def _command(name: str, *extra: str, script: list[str] | None = None, evaluate: bool = False) -> list[str]:
    """A 2-process launch on this CPU (gloo), 2 rows per process per step."""
    args = [
        "--profile",
        "cpu-smoke",
        "--run-name",
        name,
        *([] if evaluate else ["--no-eval"]),
        "--set",
        f"train.max_steps={STEPS}",
        "--set",
        "train.eval_steps=null",
        "--set",
        "train.per_device_train_batch_size=2",
        *extra,
    ]
    target = script or ["-m", "helpers.train"]
    config = str(ROOT / "configs" / "accelerate" / "cpu-2proc.yaml")
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config,
            "--main_process_port", str(free_port()), "--num_cpu_threads_per_process", "1", *target, *args]  # fmt: skip


def _result(output: str) -> dict:
    lines = [line for line in output.splitlines() if line.startswith(RESULT_PREFIX)]
    assert lines, f"no result line in the output:\n{output[-3000:]}"
    return json.loads(lines[-1][len(RESULT_PREFIX) :])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One prepared run folder (02 + 03) copied for each launch."""
    import shutil

    root = tmp_path_factory.mktemp("scale-runs")
    prepare_run(root, "base")
    for name in ("two", "killed"):
        shutil.copytree(root / "base", root / name)
    return root


@pytest.fixture(scope="module")
def two(runs):
    """A 2-process run, each process's writes recorded by tests/audited_train.py. (That it reaches the losses of a
    1-process run at the same global batch, with equal weights on both ranks, is notebook 09's self-check, which
    the notebook chain test runs.)"""
    audit = runs / "audit"
    audit.mkdir()
    env = {**_env(runs), "AUDIT_WRITES_DIR": str(audit)}
    done = subprocess.run(_command("two", script=[str(ROOT / "tests" / "audited_train.py")]), env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    return _result(done.stdout), audit


def test_only_rank_zero_writes_the_run_folder(two, runs):
    result, audit = two
    assert (result["processes"], result["backend"]) == (2, "gloo")
    run = (runs / "two").resolve()
    records = {int(p.stem.split("-")[1]): p.read_text().splitlines() for p in audit.glob("rank-*.txt")}
    assert set(records) == {0, 1}
    inside = {rank: [line.split("\t") for line in lines if line.split("\t")[1].startswith(str(run))]
              for rank, lines in records.items()}  # fmt: skip
    assert any(f"/.{TRAIN.name}.partial/" in path for _, path in inside[0]), "rank 0 writes the step folder"
    others = [
        (event, path)
        for event, path in inside[1]
        # opening the run folder asks for it (mkdir, exist_ok: it is there already, made by rank 0 first), and the
        # Trainer's checkpoints hold one RNG state per process: nothing else may come from another process
        if not (event == "os.mkdir" and Path(path) == run)
        and not re.search(rf"/{CHECKPOINTS}/checkpoint-\d+/rng_state_1\.pth$", path)
    ]
    assert others == [], f"rank 1 wrote into the run folder: {others}"
    assert RunFolder(run, "cpu-smoke").require(TRAIN)["processes"] == 2


def test_a_killed_two_process_run_resumes_from_its_last_checkpoint(two, runs):
    unbroken, _ = two
    checkpoints = runs / "killed" / CHECKPOINTS
    # with the evaluations before and after, which once left DDP out of the loop (see helpers/train.py)
    command = _command("killed", "--set", "train.save_steps=1", evaluate=True)
    log = runs / "killed.log"  # a file, not a pipe: nobody reads a pipe while we wait, and a full one would block
    with log.open("w") as out:
        process = subprocess.Popen(command, env=_env(runs), stdout=out, stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    while not list(checkpoints.glob("checkpoint-1/trainer_state.json")) and time.time() < deadline:
        assert process.poll() is None, log.read_text()[-3000:]
        time.sleep(1)
    # the launcher and every process under it at once, as a crash or a lost machine would; torchrun starts each
    # worker in a session of its own, so killing the launcher's process group alone would leave them training
    tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    for member in tree:
        member.send_signal(signal.SIGKILL)
    psutil.wait_procs(tree, timeout=30)
    process.wait()
    assert not (runs / "killed" / TRAIN.name).exists()
    again = subprocess.run(command, env=_env(runs), capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = _result(again.stdout)
    assert resumed["resumed_from"] and re.search(r"checkpoint-\d+$", resumed["resumed_from"])
    assert resumed["steps"] == STEPS
    assert resumed["train_losses"][-1][1] == pytest.approx(unbroken["train_losses"][-1][1], rel=LOSS_TOLERANCE)
    sums = re.findall(rf"\[rank \d/2\] step {STEPS} loss \S+ weights-checksum (\S+)", again.stdout)
    assert len(sums) == 2 and len(set(sums)) == 1, f"the processes' weights differ after resuming: {sums}"


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_each_launcher_config_parses_and_names_an_existing_profile(config):
    from accelerate.commands.config.config_args import load_config_from_file

    parsed = load_config_from_file(str(config))
    assert parsed.num_processes >= 2 and parsed.num_machines >= 1
    named = re.search(r"^# profile: (\S+)", config.read_text(), re.MULTILINE)
    assert named, f"{config.name} does not name its profile in a '# profile: <name>' line"
    assert named.group(1) in list_profiles()
    if parsed.num_machines > 1:
        assert "machine_rank" in yaml.safe_load(config.read_text())


@pytest.mark.parametrize("name", ["multi-gpu-70b", "multi-node-405b"])
def test_big_profiles_validate_and_fit_their_gpus(name):
    profile = load_profile(name)
    d = profile.distributed
    assert d is not None and (ROOT / d.launcher_config).is_file()
    assert profile.model.backend == "transformers", "Unsloth trains on one process: several need transformers"
    with pytest.raises(UnsupportedSetupError, match="Unsloth"):
        check_stack(profile.model_copy(update={"model": profile.model.model_copy(update={"backend": "unsloth"})}), 2)
    launcher = launcher_settings(ROOT / d.launcher_config)
    expected = {"strategy": d.strategy, "gpus": d.gpus_per_node * d.nodes, "nodes": d.nodes, "offload": d.offload}
    assert launcher == expected, "the profile and its launcher config disagree"
    e = profile_estimate(profile)
    print(f"{name}: {e.total_gib} GiB per GPU on {e.gpus} GPUs ({d.strategy})")
    assert fits(e, d.min_gpu_memory_gib)


def test_multi_gpu_70b_says_what_the_calculator_gives():
    """Its description: fits 4 x 24 GB and 2 x 48 GB as it is, 2 x 24 GB only with CPU offload (the offload config)."""
    profile = load_profile("multi-gpu-70b")
    for phrase in ("4 x 24 GB or 2 x 48 GB", "2 x 24 GB only with CPU offload", "fsdp-qlora-offload.yaml"):
        assert phrase in profile.description
    assert fits(profile_estimate(profile, gpus=4), 24) and fits(profile_estimate(profile, gpus=2), 48)
    assert not fits(profile_estimate(profile, gpus=2), 24)
    assert fits(profile_estimate(profile, gpus=2, offload=True), 24)


def test_multi_node_405b_says_one_node_fits_qlora_and_full_fine_tuning_needs_many():
    profile = load_profile("multi-node-405b")
    assert "405B QLoRA fits one such node" in profile.description and "for speed" in profile.description
    assert fits(profile_estimate(profile, gpus=8), 80)  # one node of 8 x 80 GB
    full = fewest_gpus("405B", 80, method="full", strategy="zero3")
    assert full is not None and full > 8 * profile.distributed.nodes  # more than this profile's 4 nodes


OFFLOAD_CONFIG = ROOT / "configs" / "accelerate" / "fsdp-qlora-offload.yaml"


def test_the_offload_config_is_accepted_by_accelerate_and_sized_by_the_calculator():
    """accelerate's own launcher parses and validates it into the environment its FSDP plugin reads: FSDP2, FULL_SHARD,
    parameters offloaded to CPU; the calculator, at those settings, fits 70B QLoRA on 2 x 24 GB, and would not
    without the offload."""
    from unittest import mock

    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env
    from torch.distributed.fsdp import CPUOffloadPolicy

    args = launch_command_parser().parse_args(["--config_file", str(OFFLOAD_CONFIG), "train.py"])
    args, _, _ = _validate_launch_command(args)
    env = prepare_multi_gpu_env(args)
    with mock.patch.dict(os.environ, env):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert isinstance(plugin.cpu_offload, CPUOffloadPolicy)
    settings = launcher_settings(OFFLOAD_CONFIG)
    assert settings == {"strategy": "fsdp_full", "gpus": 2, "nodes": 1, "offload": True}
    profile = load_profile("multi-gpu-70b")
    offloaded = profile_estimate(profile, config=OFFLOAD_CONFIG)
    assert (offloaded.gpus, offloaded.offload, offloaded.optimizer_gib, offloaded.trainable_gib) == (2, True, 0, 0)
    assert offloaded.cpu_ram_gib > 0 and fits(offloaded, 24)
    assert not fits(profile_estimate(profile, config=OFFLOAD_CONFIG, offload=False), 24)


def test_memory_calculator_agrees_with_accelerates_own_estimate():
    for size in LLAMA31:
        theirs = accelerate_estimate(size)
        assert parameter_counts(size)["total"] == pytest.approx(theirs["parameters"], rel=1e-6)
        ours = estimate(size, "full", "ddp", 1)
        without_activations = ours.total_gib - ours.activations_gib - ours.logits_gib
        assert without_activations == pytest.approx(theirs["training_adam_gib"], rel=0.01)  # both 16 bytes/param
    assert parameter_counts("8B")["total"] == pytest.approx(8.03e9, rel=1e-3)
    assert parameter_counts("70B")["total"] == pytest.approx(70.6e9, rel=1e-3)
    assert parameter_counts("405B")["total"] == pytest.approx(405.9e9, rel=1e-3)


def test_sharding_divides_what_each_stage_says():
    ddp, z1, z2, z3 = (estimate("70B", "full", s, 8) for s in ("ddp", "zero1", "zero2", "zero3"))
    assert z1.optimizer_gib == pytest.approx(ddp.optimizer_gib / 8, abs=0.01) and z1.gradients_gib == ddp.gradients_gib
    assert z2.gradients_gib == pytest.approx(ddp.gradients_gib / 8, abs=0.01) and z2.weights_gib == ddp.weights_gib
    assert z3.weights_gib < ddp.weights_gib / 4
    offload = estimate("70B", "full", "zero3", 8, offload=True)
    assert offload.optimizer_gib == 0 and offload.cpu_ram_gib > 0
    assert estimate("8B", "qlora", "ddp", 1).total_gib < 24 < estimate("8B", "full", "ddp", 1).total_gib


def test_overrides_parse_as_yaml_values():
    assert parse_overrides(["train.max_steps=8", "train.eval_steps=null"]) == {
        "train": {"max_steps": 8, "eval_steps": None}
    }


def test_a_launch_command_names_its_processes_and_a_port_of_its_own():
    one = launch_command("cpu-smoke", "r", 1, "--no-eval")
    assert one[1:] == ["-m", "helpers.train", "--profile", "cpu-smoke", "--run-name", "r", "--no-eval"]
    two = launch_command("cpu-smoke", "r", 2)
    assert two[two.index("--num_processes") + 1] == "2" and two[-6:-4] == ["-m", "helpers.train"]
    assert two[two.index("--main_process_port") + 1].isdigit()


def test_rank_lines_split_a_shared_pipe_by_process():
    log = "[rank 0/2] step 1 loss 1.0[rank 1/2] step 1 loss 1.0\nwarning\n[rank 1/2] saved\n"
    assert rank_lines(log) == {0: ["step 1 loss 1.0"], 1: ["step 1 loss 1.0", "saved"]}
