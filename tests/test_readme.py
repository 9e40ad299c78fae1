"""README's command lines, run exactly as printed, in a folder laid out as `fvq-rater demo` leaves it."""
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fvq_plugin.cli import main
from fvq_plugin.data import read_split

README = Path(__file__).parents[1] / "README.md"


def readme_block(tag: str) -> str:
    """The fenced block after `<!-- tag -->` (as .ci/run reads its two commands)."""
    lines = README.read_text().splitlines()
    start = lines.index(f"<!-- {tag} -->") + 2
    return "\n".join(lines[start:lines.index("```", start)])


@pytest.fixture(scope="module")
def after_the_demo(tmp_path_factory, demo_set, checkpoint):
    """A working folder holding fvq-demo/data and fvq-demo/stage2/best (the session's small demo set and rater)."""
    folder = tmp_path_factory.mktemp("newcomer")
    (folder / "fvq-demo" / "stage2").mkdir(parents=True)
    (folder / "fvq-demo" / "data").symlink_to(demo_set)
    (folder / "fvq-demo" / "stage2" / "best").symlink_to(checkpoint)
    return folder


def test_every_walkthrough_command_runs_as_written(after_the_demo, monkeypatch, capsys):
    monkeypatch.chdir(after_the_demo)
    lines = readme_block("walkthrough").splitlines()
    assert len(lines) >= 9 and {shlex.split(line)[0] for line in lines} >= {"fvq-rater"}
    for line in lines:
        words = shlex.split(line)
        variables = {}
        while "=" in words[0]:
            name, value = words.pop(0).split("=", 1)
            variables[name] = value
        if words[0] == "fvq-rater":
            assert main(words[1:]) == 0, line
            out = capsys.readouterr().out
            if "--json" in words:
                json.loads(out)  # nothing but JSON on stdout
            continue
        executable = Path(sys.executable).parent / words[0]
        run = subprocess.run([str(executable), *words[1:]], capture_output=True, text=True, timeout=300,
                             env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **variables})
        assert run.returncode == 0 and "|fvq20k|" in run.stdout, line + run.stdout[-2000:] + run.stderr[-2000:]
    scores = [json.loads(line) for line in open("fvq-demo/scores/test.jsonl")]
    assert len(scores) == len(read_split("fvq-demo/data", "test")) and all("score" in s for s in scores)
    assert Path("fvq-demo/run2/best/fvq_rater.json").is_file() and Path("fvq-demo/another-set/meta.json").is_file()


def test_the_pyiqa_example_runs_on_a_cpu(after_the_demo, demo_set, monkeypatch):
    monkeypatch.chdir(after_the_demo)
    videos = [r.path for r in read_split(demo_set, "test")]
    for name, video in zip(("clip.mp4", "a.mp4", "b.mp4"), videos):
        Path(name).write_bytes(video.read_bytes())
    from PIL import Image

    Image.new("RGB", (64, 48), (120, 90, 60)).save("face.png")
    namespace = {"frames": torch.rand(6, 3, 40, 40)}
    code = readme_block("pyiqa-example")
    assert 'device="cpu"' in code
    exec(compile(code, "README.md (pyiqa example)", "exec"), namespace)
    metric = namespace["metric"]
    assert metric("clip.mp4").shape == (1,) and metric(["a.mp4", "b.mp4"]).shape == (2,)
