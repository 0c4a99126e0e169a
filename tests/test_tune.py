"""The tuner measures both lossless stream passes and stores the faster one."""

import json

from helpers import tiny_spec_model, word_tokenizer

from mlx_specstream import tune
from mlx_specstream.config import SpecStreamConfig


def test_tune_measures_fused_and_split_and_saves_the_choice(tmp_path, monkeypatch):
    model = tiny_spec_model("llama", vocab_size=16, num_streams=2, top_k=2, prune_adapter_rank=0)
    tokenizer = word_tokenizer(16, eos=15)
    measured = []
    real = tune.tokens_per_second

    def fake_speed(model, tokenizer, prompts, max_tokens, stream_pass=None, **tree):
        tps, tau = real(model, tokenizer, prompts, max_tokens, stream_pass=stream_pass, **tree)
        measured.append(stream_pass)
        # Top-2 trees lead the fused grid (so split is measured on them) and
        # split wins there: the choice must carry it. Timing noise cannot decide.
        if tree.get("tree_top_k") == 2 and stream_pass is not None:
            return (1e6 if stream_pass == "split" else 1e5), tau
        return tps, tau

    monkeypatch.setattr(tune, "tokens_per_second", fake_speed)
    choice, _, _ = tune.tune(model, tokenizer, [[1, 2, 3, 4]], max_tokens=6, log=lambda *a: None)
    assert {"fused", "split"} <= set(measured)
    assert choice["stream_pass"] == "split" and choice["tree_top_k"] == 2

    config = {"model_type": "llama", "speculative_streaming": SpecStreamConfig().to_dict()}
    (tmp_path / "config.json").write_text(json.dumps(config))
    section = tune.save_choice(tmp_path, choice)
    saved = json.loads((tmp_path / "config.json").read_text())["speculative_streaming"]
    assert saved["stream_pass"] == "split" == section["stream_pass"]
    assert (tmp_path / "config.json.before-tune").exists()
    SpecStreamConfig.from_dict(saved)  # still a valid section
