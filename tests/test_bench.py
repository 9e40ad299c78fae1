import json

from fvq_plugin.cli import main


def test_model_benchmark_prints_the_batch_ratio_and_saves_json(tmp_path, capsys):
    out = tmp_path / "model.json"
    assert main(["bench", "--stage", "model", "--out", str(out)]) == 0
    assert "throughput b8 over b1" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert set(result["batches"]) == {"1", "8"} and result["throughput_b8_over_b1"] > 0


def test_features_benchmark_reports_decode_and_cache_ratios(tmp_path, capsys):
    out = tmp_path / "features.json"
    assert main(["bench", "--stage", "features", "--videos", "1", "--image-size", "64", "--temporal", "kinetics",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "whole 300-frame clip" in printed and "cached / uncached" in printed
    result = json.loads(out.read_text())
    assert set(result["per_video_s"]) == {"decode", "spatial", "portrait", "face", "temporal"}
    assert 0 < result["sampled_over_full"] and 0 < result["cached_over_uncached"]
