"""The command line as a newcomer meets it: no lost work, no tracebacks, machine-readable output."""
import json
import shutil
import subprocess
import sys

import pytest

from fvq_plugin import cli
from fvq_plugin.cli import main
from fvq_plugin.data import read_split


def error_of(capsys, *argv) -> str:
    assert main(list(argv)) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "Traceback" not in error, error  # one line
    return error


@pytest.fixture
def one_video(demo_set):
    return str(read_split(demo_set, "test")[0].path)


def test_output_paths_are_checked_before_scoring_and_their_folders_created(checkpoint, one_video, tmp_path, capsys,
                                                                         monkeypatch):
    scored = []
    original = cli._scorer
    monkeypatch.setattr(cli, "_scorer", lambda args: scored.append(1) or original(args))
    error = error_of(capsys, "score", one_video, "--weights", str(checkpoint), "--output", str(tmp_path))
    assert f"--output {tmp_path} is a folder; give a file name, e.g. --output {tmp_path / 'results.jsonl'}" in error
    assert "--csv" in error_of(capsys, "score", one_video, "--weights", str(checkpoint), "--csv", str(tmp_path))
    assert scored == []  # refused before the model loaded
    table = tmp_path / "new" / "folder" / "x.csv"
    assert main(["score", one_video, "--weights", str(checkpoint), "--csv", str(table)]) == 0
    assert table.is_file() and one_video in capsys.readouterr().out


def test_json_output_is_only_json(checkpoint, demo_set, one_video, tmp_path, capsys):
    assert main(["score", one_video, str(tmp_path / "missing.mp4"), "--weights", str(checkpoint), "--json"]) == 1
    captured = capsys.readouterr()
    results = json.loads(captured.out)
    assert "error" in results[1] and "1 scored, 1 failed" in captured.err
    root = tmp_path / "data"
    shutil.copytree(demo_set, root)
    (root / "test" / "videos" / "broken.mp4").write_bytes(b"junk")
    with open(root / "test" / "labels.txt", "a") as labels:
        labels.write("broken.mp4,40\n")
    assert main(["eval", "--data", str(root), "--weights", str(checkpoint), "--json"]) == 1  # a video failed
    captured = capsys.readouterr()
    assert json.loads(captured.out)["failed"] == 1 and "failed: " in captured.err and "broken.mp4" in captured.err
    assert main(["bench", "--stage", "model", "--out", str(tmp_path / "bench.json"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads((tmp_path / "bench.json").read_text())


@pytest.mark.reliability
def test_user_mistakes_are_one_line_naming_the_flag_and_the_fix(checkpoint, one_video, tmp_path, capsys,
                                                                monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "--device cuda: no CUDA GPU is visible" in error_of(capsys, "score", one_video, "--weights",
                                                                str(checkpoint), "--device", "cuda")
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "flash_attn" else object())
    assert "pip install flash-attn" in error_of(capsys, "score", one_video, "--weights", str(checkpoint),
                                                "--attn", "flash_attention_2")
    monkeypatch.undo()
    with pytest.raises(SystemExit):
        main(["score", one_video, "--attn", "fast"])
    assert "invalid choice: 'fast'" in capsys.readouterr().err
    monkeypatch.setenv("FVQ_RATER_WEIGHTS", str(tmp_path))
    assert f"FVQ_RATER_WEIGHTS (from the environment): {tmp_path} is not an FVQ-Rater checkpoint" in \
        error_of(capsys, "score", one_video)
    monkeypatch.delenv("FVQ_RATER_WEIGHTS")
    error = error_of(capsys, "score", one_video, "--weights", str(checkpoint.parent))  # stage2/ holds best/ and last/
    assert f"The checkpoints below it are {checkpoint.parent / 'best'}, {checkpoint}: pass one of them." in error
    assert "fvq-rater demo" in error_of(capsys, "score", one_video, "--weights", str(tmp_path / "nowhere"))


def test_the_dataset_is_checked_before_the_model_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_scorer", lambda args: pytest.fail("the model loaded before the dataset was checked"))
    assert main(["eval", "--data", str(tmp_path), "--weights", str(tmp_path)]) == 2
    assert "labels.txt: labels file not found" in capsys.readouterr().err


def test_usage_errors_and_help_never_import_torch():
    code = ("import sys\nfrom fvq_plugin.cli import main\nfor argv in (['score'], ['train', '--help'], ['--version']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\nprint('torch' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.stdout.strip().endswith("False"), run.stderr[-2000:]
    assert "name the videos one way: PATH..., --manifest FILE or --data ROOT" in run.stderr


@pytest.mark.reliability
def test_empty_and_tiny_datasets_are_said_plainly(demo_set, checkpoint, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(demo_set, root)
    (root / "val" / "labels.txt").write_text("name,mos\n")
    assert main(["validate", str(root), "--split", "val"]) == 1
    assert "labels.txt: no videos listed" in capsys.readouterr().out
    kept = (root / "test" / "labels.txt").read_text().splitlines()[:2]
    (root / "test" / "labels.txt").write_text("\n".join(kept) + "\n")
    assert main(["eval", "--data", str(root), "--weights", str(checkpoint)]) == 1
    captured = capsys.readouterr()
    assert "only 2 scored, 0 failed; SRCC, PLCC, KRCC and RMSE need at least 3 scored videos" in captured.out
    assert "nan" not in captured.out.lower() and "Warning" not in captured.err
    assert "the minimum is 57 videos" in error_of(capsys, "make-demo-data", str(tmp_path / "few"), "--videos", "20")


def test_score_takes_folders_and_says_what_it_did(checkpoint, demo_set, tmp_path, capsys):
    folder = demo_set / "test" / "videos"
    videos = sorted(str(p) for p in folder.iterdir())
    output = tmp_path / "scores.jsonl"
    assert main(["score", str(folder), "--weights", str(checkpoint), "--output", str(output)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[-1] for line in lines[:-1]] == videos and lines[-1] == f"{len(videos)} scored, 0 failed"
    assert main(["score", str(folder), "--weights", str(checkpoint), "--output", str(output)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == \
        f"{len(videos)} scored, 0 failed, {len(videos)} resumed from {output}"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no video or image files" in error_of(capsys, "score", str(empty), "--weights", str(checkpoint))


def test_help_shows_defaults_version_and_bare_command(capsys):
    assert main([]) == 0
    assert "COMMAND" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("fvq-rater 0.")
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("(default: 3)", "(default: 0.0002)", "(default: 8)", "(default: cpu)", "(default: auto)"):
        assert shown in text, shown


def test_train_keeps_a_finished_run_and_says_when_stage_2_starts_from_scratch(demo_set, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    error = error_of(capsys, "train", "--data", str(demo_set), "--stage", "1", "--out", str(out))
    assert "--out" in error and "is not empty" in error and "--overwrite" in error
    error = error_of(capsys, "train", "--data", str(demo_set), "--stage", "1", "--out", str(tmp_path / "none"),
                     "--epochs", "0")
    assert "--epochs 0 --batch-size 8: give at least 1 of each" in error  # no run, so no best epoch to print
    assert main(["train", "--data", str(demo_set), "--stage", "2", "--out", str(tmp_path / "fresh"), "--epochs", "1",
                 "--frames", "4", "--key-metric", "srcc"]) == 0
    printed = capsys.readouterr()
    assert "without --init starts from scratch" in printed.err
    assert "best: epoch 1, validation SRCC" in printed.out


def test_recipe_flags_belong_to_new_raters_and_convert_needs_a_recipe(checkpoint, demo_set, tmp_path, capsys):
    error = error_of(capsys, "train", "--data", str(demo_set), "--stage", "2", "--out", str(tmp_path / "run"),
                     "--init", str(checkpoint), "--recipe", "finevq")
    assert "--recipe" in error and "--init continues a rater with its own recipe" in error
    with pytest.raises(SystemExit):
        main(["convert", str(tmp_path), str(tmp_path / "out")])
    assert "one of the arguments --recipe --recipe-file is required" in capsys.readouterr().err


def test_train_on_a_local_internvl_backbone(demo_set, tmp_path, capsys):
    from transformers import InternVLForConditionalGeneration

    from fvq_plugin.tiny import tiny_backbone_config, tiny_tokenizer

    backbone = tmp_path / "internvl"
    tokenizer = tiny_tokenizer()
    InternVLForConditionalGeneration(tiny_backbone_config(tokenizer, image_size=32)).save_pretrained(backbone)
    tokenizer.save_pretrained(backbone)
    capsys.readouterr()
    assert "--temporal-random" in error_of(capsys, "train", "--data", str(demo_set), "--stage", "1", "--out",
                                           str(tmp_path / "refused"), "--backbone", str(backbone))
    # A recipe file: fvq's conventions without the motion stream (no SlowFast to run in a test).
    from fvq_plugin.recipe import FVQ

    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(FVQ.replace(name="fvq-still", projectors={"portrait": "ln-mlp", "face": "ln-mlp"})
                                 .to_dict()))
    assert main(["train", "--data", str(demo_set), "--stage", "1", "--out", str(tmp_path / "run"), "--backbone",
                 str(backbone), "--epochs", "1", "--frames", "4", "--recipe-file", str(recipe)]) == 0
    config = json.loads((tmp_path / "run" / "best" / "fvq_rater.json").read_text())
    assert config["features"]["image_size"] == 32 and config["backbone"] == str(backbone.resolve())
    assert config["recipe"]["name"] == "fvq-still[num_frames=4]" and config["streams"] == ["spatial", "portrait", "face"]
    assert config["features"]["streams"] == config["streams"] and config["recipe"]["mos_range"][0] >= 0


@pytest.mark.reliability
def test_only_input_errors_become_one_line_and_bugs_keep_their_traceback(monkeypatch, capsys, tmp_path):
    from fvq_plugin.errors import InputError

    monkeypatch.setattr(cli, "_validate", lambda args: (_ for _ in ()).throw(InputError("your file is odd")))
    assert main(["validate", str(tmp_path)]) == 2
    assert capsys.readouterr().err == "fvq-rater validate: error: your file is odd\n"
    monkeypatch.setattr(cli, "_validate", lambda args: (_ for _ in ()).throw(ValueError("an internal bug")))
    with pytest.raises(ValueError, match="an internal bug"):
        main(["validate", str(tmp_path)])


def test_train_checks_device_and_attention_before_loading_anything(demo_set, tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "--device cuda: no CUDA GPU is visible" in error_of(capsys, "train", "--data", str(demo_set), "--stage",
                                                                "1", "--out", str(tmp_path / "run"), "--device", "cuda")
