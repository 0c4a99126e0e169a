"""``python -m mlx_specstream.benchmark``: what each row runs (timings are not tested)."""

import json
import shutil

import pytest
from helpers import benchmark_settings

from mlx_specstream import benchmark
from mlx_specstream.default_model import DEFAULT_DIR, DRAFT_DIR
from mlx_specstream.precision import device_key


def test_the_default_tree_row_drafts_with_streams_when_the_config_stored_prompt_lookup(
    tmp_path, monkeypatch
):
    """A tuning may store ``draft: ngram``; the default-tree row still measures the
    model's own stream tree, and the tuned row says it runs prompt lookup."""
    model_dir = tmp_path / "model"
    shutil.copytree(DEFAULT_DIR, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["speculative_streaming"]["tuned"][device_key()] = {"draft": "ngram"}
    (model_dir / "config.json").write_text(json.dumps(config))
    settings = benchmark_settings(monkeypatch)
    benchmark.main(
        ["--model", str(model_dir), "--draft-model", str(DRAFT_DIR), "--num-prompts", "1",
         "--max-tokens", "12", "--runs", "1", "--sampling-temps", "--output-dir",
         str(tmp_path / "out"), "--name", "t"]
    )  # fmt: skip
    assert any(s.get("draft") == "streams" and s.get("tree_depth") for s in settings)
    summary = (tmp_path / "out" / "t.md").read_text()
    assert "SS default tree (k=3, 16 nodes)" in summary and "SS tuned (draft=ngram)" in summary
    assert benchmark.DEFAULT_GROWN not in summary  # (streams fill static trees only)
    # The embedded draft model's rows: its chain, and the tree it grows (EAGLE-2's).
    assert "SS verifier, same draft model" in summary and benchmark.GROWN_TREE in summary
    assert any(s.get("dynamic_tree") and s.get("draft_model") is not None for s in settings)
    assert "Command: `python -m mlx_specstream.benchmark --model " in summary
    assert f"Tuned settings: those stored for this device ({device_key()})." in summary
    # gpt-fast's "bandwidth achieved": the base's float32 weight bytes times tokens/s.
    results = json.loads((tmp_path / "out" / "t.json").read_text())
    assert results["info"]["weight_bytes"] == 4 * results["info"]["base_parameters"]
    for v in results["summary"].values():
        want = results["info"]["weight_bytes"] * v["tokens_per_s"] / 1e9
        assert abs(v["bandwidth_gbps"] - want) < 1e-9
    assert "bandwidth achieved (GB/s)" in summary


def test_check_outputs_raises_for_ours_and_reports_mlx_lm():
    """Ours must equal plain decoding; mlx-lm's own methods (its draft-model decoding
    leaves plain decoding's output on sliding-window models) are reported, not fatal."""
    from mlx_specstream.benchmark import check_outputs

    plain = [1, 2, 3]
    same = {"SS no speculation": plain, "SS tuned": plain, "mlx-lm draft model": plain}
    assert check_outputs(same, 0, True) == []
    theirs = {**same, "mlx-lm draft model": [1, 2, 4]}
    assert check_outputs(theirs, 5, True) == [
        "prompt 5: mlx-lm draft model leaves plain decoding's output at token 2"
    ]
    assert check_outputs(theirs, 5, False) == []  # (shared mode: another model than mlx-lm's)
    with pytest.raises(AssertionError, match="prompt 1: 'SS tuned' output differs"):
        check_outputs({**same, "SS tuned": [1, 3, 3]}, 1, False)
