"""lmms-eval: `--model fvq_rater` and the fvq20k tasks, through lmms-eval's own CLI, found with no flag."""
import importlib.metadata
import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port
from fvq_plugin.data import read_split
from fvq_plugin.model import CheckpointError
from fvq_plugin.scoring import Scorer, evaluate

from tiny_qwen2_vl import build_tiny_checkpoint

METRICS = ("srcc", "plcc", "krcc", "rmse")
# OMP: two ranks on two cores must not each start a thread per core.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "OMP_NUM_THREADS": "1"}


def lmms_eval(root, out, model, model_args, tasks, processes=1, timeout=300) -> tuple[dict, list[dict], str]:
    """Run lmms-eval's CLI exactly as a user would: its results for the task, the logged samples, its output."""
    launcher = [sys.executable, "-m", "lmms_eval"]
    if processes > 1:
        # accelerate 1.15's --cpu starts one process unless MPI is set up; --multi_gpu forms a gloo group on CPU.
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                    str(processes), "--main_process_port", str(free_port()), "-m", "lmms_eval"]
    command = [*launcher, "--model", model, "--model_args", model_args, "--tasks", tasks, "--batch_size", "4",
               "--output_path", str(out), "--log_samples"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env={**ENV, "FVQ20K_ROOT": str(root)})
    results = sorted(Path(out).rglob("*_results.json"))
    # lmms-eval exits 0 even when the evaluation raised: the results file is the proof of a run.
    assert run.returncode == 0 and results, run.stdout[-4000:] + run.stderr[-4000:]
    samples = [json.loads(line) for file in Path(out).rglob(f"*_samples_{tasks}.jsonl") for line in file.open()]
    return json.loads(results[-1].read_text())["results"][tasks], samples, run.stdout + run.stderr


@pytest.fixture(scope="module")
def root_with_a_broken_video(demo_set, tmp_path_factory):
    """The demo set, whose test split also lists a file that is not a video."""
    root = tmp_path_factory.mktemp("fvq20k") / "data"
    shutil.copytree(demo_set, root)
    (root / "test" / "videos" / "broken.mp4").write_bytes(b"not a video")
    with open(root / "test" / "labels.txt", "a") as labels:
        labels.write("broken.mp4,50.0\n")
    return root


@pytest.fixture(scope="module")
def one_process(root_with_a_broken_video, checkpoint, tmp_path_factory):
    return lmms_eval(root_with_a_broken_video, tmp_path_factory.mktemp("lmms"), "fvq_rater",
                     f"pretrained={checkpoint}", "fvq20k")


def test_fvq20k_metrics_equal_fvq_rater_eval(one_process, root_with_a_broken_video, checkpoint):
    results, _, _ = one_process
    report, per_video = evaluate(Scorer.from_pretrained(checkpoint), root_with_a_broken_video, "test", progress=False)
    for metric in METRICS:
        assert results[f"{metric},none"] == pytest.approx(report[metric], abs=1e-6), metric
    assert results["n_scored,none"] == report["scored"] == len(per_video) - 1
    assert results["n_failed,none"] == report["failed"] == 1 and results["n_unparsed,none"] == 0


def test_log_samples_show_path_mos_score_and_answer_and_the_failure_reason(one_process, root_with_a_broken_video):
    _, samples, _ = one_process
    records = {str(r.path): r.mos for r in read_split(root_with_a_broken_video, "test")}
    assert sorted(s["srcc"]["path"] for s in samples) == sorted(records)
    for sample in samples:
        video = sample["srcc"]
        assert video["mos"] == records[video["path"]]
        if video["path"].endswith("broken.mp4"):
            assert video["pred"] is None and sample["n_failed"] == 1
            assert sample["filtered_resps"].startswith("[error] ") and "broken.mp4" in sample["filtered_resps"]
        else:
            assert sample["filtered_resps"].startswith("The video quality is ")
            assert sample["filtered_resps"].endswith(f". The score is {video['pred']:.2f}.")


def test_two_processes_shard_the_videos_and_report_the_same_metrics(one_process, root_with_a_broken_video,
                                                                    checkpoint, tmp_path):
    results, samples, output = lmms_eval(root_with_a_broken_video, tmp_path, "fvq_rater", f"pretrained={checkpoint}",
                                         "fvq20k", processes=2)
    assert "Running on rank 1 (local rank 1)" in output
    single, single_samples, _ = one_process
    for metric in (*METRICS, "n_scored", "n_failed", "n_unparsed"):
        assert results[f"{metric},none"] == pytest.approx(single[f"{metric},none"], abs=1e-6), metric
    # Every video once: no double counting of lmms-eval's padding requests.
    assert sorted(s["srcc"]["path"] for s in samples) == sorted(s["srcc"]["path"] for s in single_samples)


def test_any_lmms_eval_model_runs_fvq20k_generic(demo_set, tmp_path):
    """lmms-eval's own Qwen2-VL class on a tiny random Qwen2-VL: its nonsense answers are counted as unparsed."""
    checkpoint = build_tiny_checkpoint(tmp_path / "qwen2-vl")
    results, samples, _ = lmms_eval(demo_set, tmp_path / "out", "qwen2_vl",
                                 f"pretrained={checkpoint},device=cpu,device_map=cpu", "fvq20k_generic")
    videos = len(read_split(demo_set, "test"))
    assert len(samples) == videos and results["n_failed,none"] == 0
    assert results["n_scored,none"] + results["n_unparsed,none"] == videos
    assert all("0 (worst) to 100 (best)" in s["input"] for s in samples)


def test_the_group_and_both_splits_are_registered_with_no_include_path():
    from lmms_eval.tasks import TaskManager

    from fvq_plugin.integrations.lmms_eval import task_folder

    manager = TaskManager("WARNING")
    assert {"fvq20k", "fvq20k_val", "fvq20k_generic", "fvq20k_all"} <= set(manager.all_tasks)
    assert manager.task_index["fvq20k_all"]["type"] == "group"
    assert Path(manager.task_index["fvq20k"]["yaml_path"]).parent == Path(task_folder()) / "fvq20k"


def test_tasks_read_the_split_they_name(demo_set, monkeypatch):
    from lmms_eval.tasks import TaskManager

    monkeypatch.setenv("FVQ20K_ROOT", str(demo_set))
    tasks = TaskManager("WARNING").load_task_or_group(["fvq20k", "fvq20k_val"])
    for name, split in (("fvq20k", "test"), ("fvq20k_val", "val")):
        docs = tasks[name].test_docs()
        assert [d["path"] for d in docs] == [str(r.path) for r in read_split(demo_set, split)]
        assert [d["mos"] for d in docs] == [r.mos for r in read_split(demo_set, split)]


def test_a_missing_or_malformed_root_is_one_clear_error(tmp_path, monkeypatch):
    from lmms_eval.tasks import TaskManager

    monkeypatch.delenv("FVQ20K_ROOT", raising=False)
    with pytest.raises(ValueError, match="no FVQ-20K root. Set FVQ20K_ROOT"):
        TaskManager("WARNING").load_task_or_group(["fvq20k"])
    monkeypatch.setenv("FVQ20K_ROOT", str(tmp_path))
    with pytest.raises(ValueError, match=f"FVQ-20K root {tmp_path} is not usable.*fvq-rater validate"):
        TaskManager("WARNING").load_task_or_group(["fvq20k"])


def test_model_args_errors_are_clear(monkeypatch, tmp_path, checkpoint):
    from fvq_plugin.integrations.lmms_eval import FVQRaterLMM

    monkeypatch.delenv("FVQ_RATER_WEIGHTS", raising=False)
    with pytest.raises(CheckpointError, match="pass --model_args pretrained=DIR or set FVQ_RATER_WEIGHTS"):
        FVQRaterLMM()
    with pytest.raises(CheckpointError, match="not an FVQ-Rater checkpoint"):
        FVQRaterLMM(pretrained=str(tmp_path))
    with pytest.raises(ValueError, match="unknown model_args.*'temperature'"):
        FVQRaterLMM(pretrained=str(checkpoint), temperature=0)
    with pytest.raises(ValueError, match="unknown dtype"):
        FVQRaterLMM(pretrained=str(checkpoint), dtype="float8")


def test_loglikelihood_is_refused_with_the_reason(checkpoint):
    from fvq_plugin.integrations.lmms_eval import FVQRaterLMM

    model = FVQRaterLMM(pretrained=str(checkpoint), batch_size="2", device="cpu")
    assert model.batch_size == 2 and model.rank == 0 and model.world_size == 1
    with pytest.raises(NotImplementedError, match="builds its own prompt"):
        model.loglikelihood([])


def _python(code, **env):
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**ENV, **env}, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout.strip().splitlines()[-1]


def test_pyiqa_alone_finds_fvq_rater(checkpoint, demo_set):
    video = str(read_split(demo_set, "test")[0].path)
    code = f"import pyiqa; print(float(pyiqa.create_metric('fvq_rater', device='cpu', pretrained_model_path={str(checkpoint)!r})({video!r})))"
    expected = Scorer.from_pretrained(checkpoint).score([video], progress=False)[0]["score"]
    assert float(_python(code)) == pytest.approx(expected, abs=1e-5)


def test_lmms_eval_alone_finds_the_model_and_the_tasks():
    code = ("from lmms_eval.models import get_model; from lmms_eval.tasks import TaskManager; "
            "print(get_model('fvq_rater').__name__, sorted(t for t in TaskManager('WARNING').all_tasks if 'fvq' in t))")
    assert _python(code) == "FVQRaterLMM ['fvq20k', 'fvq20k_all', 'fvq20k_generic', 'fvq20k_val']"


def test_discovery_imports_nothing_heavy_and_steps_aside_once_both_frameworks_are_loaded():
    heavy = "sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'numpy', 'pyiqa', 'lmms_eval', 'transformers'})"
    assert _python(f"import sys; print({heavy})") == "[]"
    assert _python("import sys; print('fvq_plugin' in sys.modules)") == "True"  # the .pth hook is installed
    watching = "any(type(f).__name__ == '_AfterImport' for f in sys.meta_path)"
    assert _python(f"import sys, json, pyiqa; print({watching})") == "True"  # still waiting for lmms-eval
    assert _python(f"import sys, pyiqa, lmms_eval.tasks; print({watching})") == "False"


def test_a_spec_looked_up_before_the_import_does_not_use_up_the_hook():
    code = ("import importlib.util; importlib.util.find_spec('pyiqa'); import pyiqa; "
            "print('fvq_rater' in pyiqa.list_models())")
    assert _python(code) == "True"


def test_discovery_can_be_switched_off():
    code = "import pyiqa; print('fvq_rater' in pyiqa.list_models())"
    assert _python(code, FVQ_PLUGIN_DISCOVERY="0") == "False"
    assert _python(code) == "True"


def test_a_failing_registration_warns_and_never_breaks_the_framework():
    from fvq_plugin.integrations import discovery

    with pytest.warns(RuntimeWarning, match="could not register with pyiqa: ZeroDivisionError"):
        discovery._run(lambda module: 1 / 0, "pyiqa", None)


def test_the_framework_code_our_hooks_rely_on_is_unchanged():
    """Fails when an lmms-eval or pyiqa release moves what fvq_plugin.integrations relies on."""
    import pyiqa
    from lmms_eval.api.task import ConfigurableTask
    from lmms_eval.models.registry_v2 import ModelRegistryV2
    from lmms_eval.tasks import TaskManager

    assert importlib.metadata.version("lmms_eval") == "0.7.3" and pyiqa.__version__ == "0.1.16"
    initialize = inspect.unwrap(TaskManager.initialize_tasks)
    assert list(inspect.signature(initialize).parameters) == ["self", "include_path", "include_defaults"]
    assert "self.initialize_tasks(include_path=include_path" in inspect.getsource(TaskManager.__init__)
    assert 'config["class"](config=config)' in inspect.getsource(TaskManager._load_individual_task_or_group)
    assert inspect.signature(ModelRegistryV2.load_entrypoint_manifests).parameters["group"].default == "lmms_eval.models"
    assert "self.download(self.config.dataset_kwargs)" in inspect.getsource(ConfigurableTask.__init__)
    # Why pyiqa needs the hook: create_metric checks its config table before loading any plugin.
    assert "assert metric_name in DEFAULT_CONFIGS" in inspect.getsource(pyiqa.create_metric)


def test_the_demo_reports_lmms_eval_next_to_the_scorer(demo_set, checkpoint, feature_cache):
    from fvq_plugin.demo import format_reports, lmms_eval_report

    report, _ = evaluate(Scorer.from_pretrained(checkpoint), demo_set, "test", progress=False)
    through_lmms_eval = lmms_eval_report(checkpoint, demo_set, feature_cache)
    for metric in METRICS:
        assert through_lmms_eval[metric] == pytest.approx(report[metric], abs=1e-6), metric
    assert (through_lmms_eval["scored"], through_lmms_eval["failed"]) == (report["scored"], report["failed"])
    table = format_reports({"fvq-rater eval": report, "lmms-eval": through_lmms_eval}, "Test split")
    assert table.splitlines()[2].split()[1:] == [f"{report['srcc']:.4f}"] * 2
