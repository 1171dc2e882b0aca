"""`launcher/run.py` end to end with real processes: refusal before start, a stage-1 run with
its checkpoints and metrics, SIGTERM. Kills, broken checkpoints and the other faults are the
fault campaign's (tests/faults)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pali3_train.config import load_config
from pali3_train.engine.checkpoint import find_latest, verify
from pali3_train.models import PaLI3
from pali3_train.plots import read_metrics
from tests.engine.conftest import ROOT, launch, launch_command, launch_env, stage_config


def _losses(run_dir: Path) -> dict[int, float]:
    return {step: row["loss"] for step, row in read_metrics(run_dir / "metrics.jsonl").items()}


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.2)


def test_a_bad_layout_is_refused_on_every_rank_before_any_work(demo, tmp_path):
    config = stage_config(demo, tmp_path / "run", parallel={"tensor_parallel_size": 4})
    result = launch(config, 2, timeout=120)
    assert result.returncode != 0
    message = "parallel.tensor_parallel_size: 4 does not divide the world size 2"
    assert result.stderr.count(message) == 1, result.stderr[-3000:]  # rank 0 says it for all
    assert not (tmp_path / "run").exists()


def test_a_bad_config_exits_2_with_one_line(one_process_runs):
    result, _ = one_process_runs["bad_config"]
    assert result.returncode == 2
    assert (
        "train.micro_batch_size: micro_batch_size=4 does not divide global_batch_size=6"
        in result.stderr
    )
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_stage1_run_logs_every_step_and_leaves_verified_checkpoints(reference):
    losses = _losses(reference)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert losses[6] < losses[1]
    ckpts = reference / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == [
        "step_00000002",
        "step_00000004",
        "step_00000006",
    ]
    for path in ckpts.glob("step_*"):
        verify(path)
    assert find_latest(ckpts) == ckpts / "step_00000006"
    assert (reference / "config.yaml").is_file()


def test_the_frozen_vit_is_unchanged_and_the_rest_trained(reference):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    cfg = load_config(reference / "config.yaml")
    torch.manual_seed(cfg.train.seed)
    initial = PaLI3(cfg.model).state_dict()
    trained = get_fp32_state_dict_from_zero_checkpoint(
        str(reference / "checkpoints/step_00000006"), tag="engine"
    )
    vit = [k for k in initial if k.startswith("vit.")]
    assert vit and all(torch.equal(trained[k], initial[k]) for k in vit)
    assert not torch.equal(trained["projection.weight"], initial["projection.weight"])
    assert not torch.equal(trained["ul2.lm_head.weight"], initial["ul2.lm_head.weight"])


def test_sigterm_saves_and_exits_with_the_requeue_code(demo, tmp_path):
    run_dir = tmp_path / "run"
    config = stage_config(demo, run_dir, train={"steps": 500}, checkpoint={"every_steps": 1000})
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "launcher/run.py"), "--stage", "1", "--config", str(config)],
        env=launch_env(),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for(run_dir / "metrics.jsonl", process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 75, stderr[-3000:]
    latest = find_latest(run_dir / "checkpoints")
    assert latest is not None and int(latest.name.split("_")[1]) == max(_losses(run_dir))


def _deepspeed_launch(config: Path, nproc: int) -> subprocess.CompletedProcess:
    deepspeed_cli = Path(sys.executable).parent / "deepspeed"
    command = [str(deepspeed_cli), "--num_gpus", str(nproc), str(ROOT / "launcher/run.py"),
               "--stage", "1", "--config", str(config)]  # fmt: skip
    return subprocess.run(command, env=launch_env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


@pytest.fixture(scope="module")
def tracked(demo, mlflow_server, tmp_path_factory):
    """One run serves two tests: 4 steps on 2 ranks through the DeepSpeed launcher, tracked in
    MLflow (what it left then is recorded), then resumed under torchrun to 6 steps."""
    run_dir = tmp_path_factory.mktemp("tracked") / "run"
    tracking = {"backend": "mlflow", "tracking_uri": mlflow_server, "experiment": "engine-test"}
    first = _deepspeed_launch(stage_config(demo, run_dir, tracking=tracking, train={"steps": 4}),
                              2)  # fmt: skip
    assert first.returncode == 0, first.stderr[-5000:]
    after_first = {"losses": _losses(run_dir), "latest": find_latest(run_dir / "checkpoints")}
    resumed = launch(stage_config(demo, run_dir, tracking=tracking, train={"steps": 6}), 2)
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    return {"run_dir": run_dir, "uri": mlflow_server, "after_first": after_first}


def test_the_deepspeed_launcher_runs_stage1(tracked):
    run_dir, after_first = tracked["run_dir"], tracked["after_first"]
    assert sorted(after_first["losses"]) == [1, 2, 3, 4]
    assert after_first["latest"] == run_dir / "checkpoints" / "step_00000004"


def test_runs_are_tracked_in_mlflow_and_a_resumed_run_continues_the_same_run(tracked):
    from mlflow import MlflowClient

    run_dir, mlflow_server = tracked["run_dir"], tracked["uri"]
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("engine-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.params["train.steps"] == "4" and run.data.params["model.vit.width"] == "64"
    assert run.data.tags["stage"] == "1" and run.data.tags["world_size"] == "2"
    assert len(run.data.tags["git_commit"]) in (40, 7) or run.data.tags["git_commit"] == "unknown"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted({m.step for m in history}) == [1, 2, 3, 4, 5, 6]
    expected = _losses(run_dir)
    assert all(m.value == pytest.approx(expected[m.step]) for m in history)
    for metric in ("lr", "grad_norm", "samples_per_s", "visual_tokens_per_s", "text_tokens_per_s",
                   "step_time_s", "memory_gib", "tflops_per_device"):  # fmt: skip
        assert len(client.get_metric_history(run.info.run_id, metric)) >= 6, metric
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "loss.png"} <= artifacts


@pytest.fixture(scope="module")
def single_core_runs(demo, tmp_path_factory) -> dict:
    """name -> (result, folder) of three independent runs whose every process is one thread (the
    bare command's DeepSpeed launcher starts one rank on a CPU), started at once: the
    activation-checkpointing pair and the brief's bare command."""
    root = tmp_path_factory.mktemp("single-core")
    folders = {name: root / name for name in ("ac-False", "ac-True", "bare")}
    for folder in folders.values():
        folder.mkdir()
    commands = {}
    for checkpointing in (False, True):
        parallel = {"zero_stage": 3, "activation_checkpointing": checkpointing}
        config = stage_config(demo, folders[f"ac-{checkpointing}"] / "run", parallel=parallel,
                              train={"steps": 3})  # fmt: skip
        commands[f"ac-{checkpointing}"] = (launch_command(config, 1), launch_env(), ROOT)
    deepspeed_cli = Path(sys.executable).parent / "deepspeed"
    short = ["train.steps=2", "train.warmup_steps=1", "eval.max_samples=4",
             "tracking.backend=none"]  # fmt: skip
    bare = [str(deepspeed_cli), str(ROOT / "launcher/run.py"), "--stage", "1", "--set", *short]
    commands["bare"] = (bare, launch_env(), folders["bare"])
    results = _run_together(commands, tmp_path_factory.mktemp("single-core-logs"), timeout=600)
    return {name: (result, folders[name]) for name, result in results.items()}


def test_activation_checkpointing_under_zero3_with_a_frozen_vit_changes_no_loss(single_core_runs):
    losses = {}
    for checkpointing in (False, True):
        result, folder = single_core_runs[f"ac-{checkpointing}"]
        assert result.returncode == 0, result.stderr[-5000:]
        losses[checkpointing] = _losses(folder / "run")
    assert sorted(losses[True]) == [1, 2, 3]
    for step, loss in losses[False].items():
        assert losses[True][step] == pytest.approx(loss, abs=1e-6)


def test_stage0_trains_siglip_and_evaluates_held_out_data(demo, demo_held_out, tmp_path):
    run_dir = tmp_path / "run"
    digits = next(s for s in demo_held_out.sources() if s.name == "digits_caption")
    held_out = {"name": "digits_heldout", "task": "caption", "languages": ["en"],
                "shards": digits.shards}  # fmt: skip
    names = "zero one two three four five six seven eight nine".split()
    evaluation = {
        "every_steps": 2,
        "sources": [held_out],
        "zero_shot": [
            {"source": "digits_heldout", "classes": names, "template": "a handwritten digit {}"}
        ],  # fmt: skip
    }
    stage = {"freeze": [], "objective": "contrastive"}
    config = stage_config(demo, run_dir, train={"steps": 3}, stage=stage, eval=evaluation)
    result = launch(config, 2, stage="0")
    assert result.returncode == 0, result.stderr[-5000:]
    assert sorted(_losses(run_dir)) == [1, 2, 3]
    meta = (run_dir / "checkpoints" / "step_00000003" / "meta.json").read_text()
    assert '"name": "0", "objective": "contrastive"' in meta  # --stage 0 named the run
    rows = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [2, 3]  # at the interval and at the end
    for row in rows:
        assert row["eval/digits_heldout/zero_shot_chance"] == pytest.approx(0.1)
        assert 0 <= row["eval/digits_heldout/zero_shot_accuracy"] <= 1
        assert {"i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5"} <= {k.rsplit("/", 1)[-1] for k in row}


def _run_py(config: Path | str, *args: str, stage: str = "1") -> list[str]:
    return [sys.executable, str(ROOT / "launcher/run.py"), "--stage", stage,
            "--config", str(config), *args]  # fmt: skip


@pytest.fixture(scope="module")
def one_process_runs(demo, tmp_path_factory) -> dict:
    """name -> (result, its folder) of the one-process `launcher/run.py` commands that end before
    any training (a refusal, a dry run): each one the start-up and a few checks, one core, so
    they are all started at once and awaited together."""
    root = tmp_path_factory.mktemp("one-process")
    names = ("bad_config", "plan", "env_world", "tp_world", "world_size", "5b", "bare_stage0")
    folders = {name: root / name for name in names}
    for folder in folders.values():
        folder.mkdir()

    def config(name: str, **sections) -> Path:
        return stage_config(demo, folders[name] / "run", **sections)

    env_world = dict(launch_env(), RANK="0", WORLD_SIZE="4", LOCAL_RANK="0")
    commands = {  # name -> (command, env, cwd)
        "bad_config": (_run_py(config("bad_config", train={"global_batch_size": 6})),
                       launch_env(), None),
        "plan": (_run_py(config("plan"), "--dry-run", "--world-size", "2"), launch_env(), ROOT),
        "env_world": (_run_py(config("env_world", train={"global_batch_size": 16}), "--dry-run",
                              "--gpus-per-node", "2"), env_world, ROOT),
        "tp_world": (_run_py(config("tp_world", parallel={"tensor_parallel_size": 2}),
                             "--dry-run", "--world-size", "3"), launch_env(), ROOT),
        "world_size": (_run_py(config("world_size"), "--world-size", "2"), launch_env(), ROOT),
        "5b": (_run_py("configs/pali3_5b/stage1.yaml", "--dry-run", "--world-size", "256"),
               launch_env(), ROOT),
        "bare_stage0": ([sys.executable, str(ROOT / "launcher/run.py"), "--stage", "0",
                         "--dry-run"], launch_env(), folders["bare_stage0"]),
    }  # fmt: skip
    results = _run_together(commands, tmp_path_factory.mktemp("one-process-logs"), timeout=300)
    return {name: (result, folders[name]) for name, result in results.items()}


def _run_together(commands: dict, logs: Path, timeout: int) -> dict:
    """name -> CompletedProcess of each (command, env, cwd), all started at once."""
    started = {}
    for name, (command, env, cwd) in commands.items():
        out = open(logs / f"{name}.out", "w+")  # noqa: SIM115 (closed below)
        err = open(logs / f"{name}.err", "w+")  # noqa: SIM115
        process = subprocess.Popen(command, env=env, cwd=cwd, stdout=out, stderr=err, text=True)
        started[name] = (command, process, out, err)
    results = {}
    try:
        for name, (command, process, out, err) in started.items():
            process.wait(timeout=timeout)
            out.seek(0), err.seek(0)
            results[name] = subprocess.CompletedProcess(command, process.returncode, out.read(),
                                                        err.read())  # fmt: skip
    finally:
        for _, process, out, err in started.values():
            if process.poll() is None:
                process.kill()
                process.wait()
            out.close(), err.close()
    return results


def test_a_dry_run_prints_the_plan_and_starts_nothing(demo, one_process_runs):
    result, folder = one_process_runs["plan"]
    run_dir = folder / "run"
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "layout      world 2 = TP 1 x DP 2; 1 node" in out
    assert "batch       global 8 = micro 4 x accumulation 1 x DP 2" in out
    assert (
        "tokens      16 image + 16 prompt + 16 target = 48 per sample (32 px); 384 per step" in out
    )
    assert "  total " in out and "frozen: vit" in out
    assert f"data        OK, {len(demo.sources())} sources" in out
    assert "resume      auto: fresh start" in out
    assert len(out.splitlines()) <= 40
    assert not run_dir.exists()


def test_a_dry_run_takes_the_world_size_from_the_environment(one_process_runs):
    result, _ = one_process_runs["env_world"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert "world 4 = TP 1 x DP 4; 2 nodes x 2, TP groups inside nodes" in result.stdout
    assert "global 16 = micro 4 x accumulation 1 x DP 4" in result.stdout


def test_a_dry_run_refuses_a_world_that_tp_does_not_divide(one_process_runs):
    result, _ = one_process_runs["tp_world"]
    assert result.returncode == 2
    assert "parallel.tensor_parallel_size: 2 does not divide the world size 3" in result.stderr
    assert result.stdout == ""


def test_world_size_without_dry_run_is_refused(one_process_runs):
    result, folder = one_process_runs["world_size"]
    run_dir = folder / "run"
    assert result.returncode == 2
    assert "--world-size is only for --dry-run" in result.stderr
    assert not run_dir.exists()


@pytest.mark.skipif(Path("/data/webli").exists(), reason="the WebLI shards exist here")
def test_a_dry_run_of_the_5b_stage1_plans_and_reports_the_missing_shards(one_process_runs):
    result, _ = one_process_runs["5b"]
    assert result.returncode == 2, result.stderr[-3000:]
    out = result.stdout
    assert "layout      world 256 = TP 4 x DP 64; 32 nodes x 8, TP groups inside nodes" in out
    assert "  total        5,000,381,312   3,004,162,048   1,996,219,264" in out
    (data,) = [line for line in out.splitlines() if line.startswith("data ")]
    assert "configs/mixtures/webli.yaml: data.sources[0].shards:" in data
    assert "matches no file" in data
    assert len(out.splitlines()) <= 40


def test_repeated_set_options_all_apply():
    from pali3_train.launcher.run import parse_args

    args = parse_args(["--stage", "1", "--config", "c.yaml", "--set", "a=1", "--set", "b=2", "c=3"])
    assert args.set == ["a=1", "b=2", "c=3"]


def test_the_briefs_bare_command_trains_the_tiny_stage1_recipe(single_core_runs):
    """`deepspeed launcher/run.py --stage 1`, no --config, in a fresh folder: the demo corpora
    are built there, the tiny stage-1 recipe trains (here 2 steps), and it says what it used."""
    result, tmp_path = single_core_runs["bare"]  # run in that fresh folder
    assert result.returncode == 0, result.stderr[-5000:]
    said = result.stdout + result.stderr
    assert f"no --config: stage 1's tiny recipe, {ROOT}/configs/tiny/stage1.yaml" in said
    assert "runs/demo/stage0/model.safetensors is not there yet" in said
    run_dir = tmp_path / "runs" / "quickstart" / "stage1"
    assert sorted(_losses(run_dir)) == [1, 2] and (run_dir / "model.safetensors").is_file()
    assert (tmp_path / "runs" / "demo_eval" / "scenes" / "manifest.json").is_file()


def test_the_bare_stage0_recipe_keeps_its_contrastive_batch_whole_on_one_rank(one_process_runs):
    """One process: the recipe's micro-batch (global / 2) would need accumulation, which the
    contrastive objective refuses; the quickstart picks global / DP instead and says so. A dry
    run builds no corpus and names the missing shards."""
    result, tmp_path = one_process_runs["bare_stage0"]
    assert result.returncode == 2, result.stderr[-3000:]  # the shards are not there
    assert "train.micro_batch_size=32" in result.stdout
    assert "1 data-parallel rank(s): micro-batch 32 keeps the global batch" in result.stdout
    assert "dry run of stage 0, contrastive objective" in result.stdout
    assert "batch       global 32 = micro 32 x accumulation 1 x DP 1" in result.stdout
    assert "data        error:" in result.stdout and "matches no file" in result.stdout
    assert not (tmp_path / "runs").exists()
