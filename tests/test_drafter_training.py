"""The PyTorch drafters: ParallelSpec's grouped training layout (golden mask and
the equivalence with standalone prefix + masks forwards) and the Medusa loss."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hf_helpers import hf_model  # noqa: E402

from convert.drafters import DrafterTrainingModel, group_layout  # noqa: E402
from mlx_specstream.config import DrafterConfig  # noqa: E402


def test_group_layout_golden():
    positions, visible = group_layout(T=3, k=3)
    # rows: r0 r1 r2 | a0:m1 m2 | a1:m1 m2 | a2:m1 m2
    assert positions.tolist() == [0, 1, 2, 1, 2, 2, 3, 3, 4]
    expected = [
        [1, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0, 0],
        [1, 0, 0, 1, 0, 0, 0, 0, 0],
        [1, 0, 0, 1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 1, 0, 0, 0],
        [1, 1, 0, 0, 0, 1, 1, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 1, 0],
        [1, 1, 1, 0, 0, 0, 0, 1, 1],
    ]
    assert visible.int().tolist() == expected


def _parallelspec(arch="llama", k=3, seed=0):
    model = hf_model(arch, weight_scale=1.0).requires_grad_(False)
    torch.manual_seed(seed)
    wrapped = DrafterTrainingModel(model, DrafterConfig(kind="parallelspec", num_draft_tokens=k))
    with torch.no_grad():  # away from the identity-like initialisation
        for p in wrapped.drafter.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return wrapped.eval()


def _standalone(wrapped, ids, a, k):
    """Logits of real row ``a`` and its masks from a causal forward on prefix + masks."""
    f = wrapped.features(ids[:, : a + 1])
    emb = wrapped.model.get_input_embeddings()(ids)
    nxt = emb[:, 1 : a + 2]
    if nxt.shape[1] < a + 1:  # the last row has no next token (zeros, as in training)
        nxt = torch.cat([nxt, torch.zeros_like(emb[:, :1])], dim=1)
    real = wrapped.drafter.fc(torch.cat([f, nxt], dim=-1))
    x = torch.cat([real, wrapped.drafter.masks[None]], dim=1)
    R = x.shape[1]
    positions = torch.arange(R)
    visible = torch.tril(torch.ones(R, R, dtype=torch.bool))[None]
    return wrapped.head(wrapped.run_layer(x, positions, visible))[0, a:]


@pytest.mark.parametrize("arch,k", [("llama", 3), ("qwen2", 4)])
def test_group_logits_equal_standalone_forwards(arch, k):
    wrapped = _parallelspec(arch, k)
    T = 9
    ids = torch.randint(0, 64, (1, T))
    with torch.no_grad():
        grouped = wrapped.level_logits(ids, torch.tensor([T]))[0]  # (T, k, V)
        for a in range(T):
            alone = _standalone(wrapped, ids, a, k)
            torch.testing.assert_close(grouped[a], alone, atol=1e-5, rtol=1e-5)


def test_group_layout_negative_control():
    """Letting masks see other groups (a plain causal mask over the grouped rows)
    changes the group logits: the equivalence test can fail."""
    import convert.drafters as d

    wrapped = _parallelspec()
    T, k = 7, 3
    ids = torch.randint(0, 64, (1, T))
    real_layout = d.group_layout

    def leaky(T, k):
        positions, _ = real_layout(T, k)
        R = len(positions)
        return positions, torch.tril(torch.ones(R, R, dtype=torch.bool))

    with torch.no_grad():
        d.group_layout = leaky
        try:
            grouped = wrapped.level_logits(ids, torch.tensor([T]))[0]
        finally:
            d.group_layout = real_layout
        alone = _standalone(wrapped, ids, 3, k)
    assert not torch.allclose(grouped[3], alone, atol=1e-4)


def test_real_rows_never_see_masks():
    wrapped = _parallelspec()
    T = 8
    ids = torch.randint(0, 64, (1, T))
    with torch.no_grad():
        before = wrapped.level_logits(ids, torch.tensor([T]))[0, :, 0]
        wrapped.drafter.masks.add_(5.0)
        after = wrapped.level_logits(ids, torch.tensor([T]))[0]
    torch.testing.assert_close(before, after[:, 0])
    assert not torch.allclose(before, after[:, 1], atol=1e-3)


def test_padding_does_not_change_valid_rows():
    wrapped = _parallelspec()
    ids = torch.randint(0, 64, (2, 10))
    ids[1, 6:] = 0
    with torch.no_grad():
        both = wrapped.level_logits(ids, torch.tensor([10, 6]))
        alone = wrapped.level_logits(ids[1:, :6], torch.tensor([6]))
    # The last valid row's level-0 input reads the padded next token; compare the rest.
    torch.testing.assert_close(both[1, :5], alone[0, :5], atol=1e-5, rtol=1e-5)


RELEASED = {
    "own": dict(layers_per_head=2, lm_heads=3, fc_bias=True, token_map_size=None),
    "base": dict(layers_per_head=1, lm_heads=0, fc_bias=True, token_map_size=None),
}


@pytest.mark.parametrize("layout", ["shared", "own", "base"])
def test_medusa_heads_start_as_the_base_head_and_train(layout):
    """Heads trained here and in the released layout (LM heads of their own copied from
    the base's, or the base's) start as the base's next-token head and train."""
    model = hf_model("llama", weight_scale=1.0).requires_grad_(False)
    config = DrafterConfig(kind="medusa", num_draft_tokens=3, medusa=RELEASED.get(layout))
    wrapped = DrafterTrainingModel(model, config)
    ids = torch.randint(0, 64, (2, 12))
    lengths, prompt_lens = torch.tensor([12, 12]), torch.tensor([1, 1])
    with torch.no_grad():
        levels = wrapped.level_logits(ids, lengths)
        base = model(input_ids=ids).logits
    # Zero-initialised residual blocks: every head is the base's next-token head.
    torch.testing.assert_close(levels[:, :, 0], base, atol=1e-5, rtol=1e-5)
    out = wrapped(ids, lengths, prompt_lens)
    out["loss"].backward()
    grads = [p.grad for p in wrapped.drafter.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in model.parameters())


# ---- PyTorch -> MLX: the converted drafter drafts what the reference drafts -------------


@pytest.mark.parametrize("kind,arch", [("medusa", "llama"), ("parallelspec", "llama"),
                                       ("parallelspec", "qwen2"), ("medusa own", "llama"),
                                       ("medusa base", "qwen2")])  # fmt: skip
def test_converted_drafter_matches_reference(kind, arch, tmp_path):
    from hf_helpers import hf_tokenizer
    from test_drafters import standalone_levels

    from convert.convert import convert
    from convert.train_drafter import save_output
    from mlx_specstream import load

    model = hf_model(arch, weight_scale=1.0).requires_grad_(False)
    torch.manual_seed(1)
    config = DrafterConfig(kind=kind.split()[0], num_draft_tokens=3,
                           medusa=RELEASED.get(kind.split()[-1]))  # fmt: skip
    wrapped = DrafterTrainingModel(model, config).eval()
    with torch.no_grad():
        for p in wrapped.drafter.parameters():
            p.add_(0.2 * torch.randn_like(p))
    save_output(tmp_path / "hf", wrapped, hf_tokenizer(56))
    convert(str(tmp_path / "hf"), tmp_path / "mlx", dtype="float32")
    mlx_model, _ = load(str(tmp_path / "mlx"))
    ids = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        ref = wrapped.level_logits(ids, torch.tensor([12]))[0]
    for a in (0, 5, 10):
        got = standalone_levels(mlx_model, ids[0].tolist(), a)
        np.testing.assert_allclose(np.array(got), ref[a].numpy(), atol=2e-4, rtol=2e-4)


def test_converter_names_bad_drafter_tensors(tmp_path):
    from hf_helpers import hf_tokenizer
    from safetensors.torch import load_file, save_file

    from convert.convert import convert
    from convert.train_drafter import save_output

    model = hf_model("llama", weight_scale=1.0).requires_grad_(False)
    wrapped = DrafterTrainingModel(model, DrafterConfig(kind="parallelspec"))
    save_output(tmp_path / "hf", wrapped, hf_tokenizer(56))
    f = tmp_path / "hf" / "drafter.safetensors"
    state = load_file(str(f))
    state["masks"] = state["masks"][:1]
    save_file(state, str(f))
    with pytest.raises(ValueError, match=r"drafter tensors.*'masks' has shape \(1, 64\)"):
        convert(str(tmp_path / "hf"), tmp_path / "mlx")
    del state["masks"]
    save_file(state, str(f))
    with pytest.raises(ValueError, match=r"missing tensors \['masks'\]"):
        convert(str(tmp_path / "hf"), tmp_path / "mlx2")


# ---- the recipe end to end: train, convert, decode losslessly with accepted drafts ------


@pytest.mark.parametrize("kind", ["medusa", "parallelspec", "medusa own"])
def test_train_convert_decode(kind, tmp_path):
    import json
    import random

    from helpers import plain_greedy, spec_tokens
    from hf_helpers import hf_tokenizer

    from convert.convert import convert
    from convert.distill import main as distill
    from convert.train_drafter import main as train_drafter
    from mlx_specstream import load

    V = 32
    rng = random.Random(0)
    patterns = [[rng.randrange(1, V - 2) for _ in range(rng.choice([5, 6, 7]))] for _ in range(6)]
    with open(tmp_path / "train.jsonl", "w") as f:
        for _ in range(240):
            p, s = rng.choice(patterns), rng.randrange(7)
            f.write(json.dumps({"text": " ".join(f"t{p[(s + i) % len(p)]}" for i in range(48))}))
            f.write("\n")
    hf_model("llama", vocab_size=V, weight_scale=1.0).save_pretrained(str(tmp_path / "base"))
    hf_tokenizer(V).save_pretrained(str(tmp_path / "base"))
    # Self-distilled data: the base's own greedy continuations of 8-token windows.
    distill(["--model", str(tmp_path / "base"), "--data", str(tmp_path / "train.jsonl"),
             "--out", str(tmp_path / "distilled.jsonl"), "--max-length", "48",
             "--window-prompt", "8"])  # fmt: skip
    layout = ["--medusa-lm-heads", "own", "--medusa-num-layers", "2"] if "own" in kind else []
    kind = kind.split()[0]
    train_drafter(
        ["--kind", kind, "--model", str(tmp_path / "base"),
         "--data", str(tmp_path / "distilled.jsonl"),
         "--out", str(tmp_path / "hf"), "--max-steps", "60", "--batch-size", "8",
         "--learning-rate", "3e-3", "--max-length", "48", "--save-steps", "1000", *layout]
    )  # fmt: skip
    if layout:  # (the released layout: a medusa section the MLX side reads)
        section = json.loads((tmp_path / "hf" / "config.json").read_text())["drafter"]
        assert section["medusa"]["lm_heads"] == 3 and section["medusa"]["layers_per_head"] == 2
    with pytest.raises(FileExistsError):
        train_drafter(["--kind", kind, "--model", str(tmp_path / "base"),
                       "--data", str(tmp_path / "train.jsonl"), "--out", str(tmp_path / "hf")])  # fmt: skip
    convert(str(tmp_path / "hf"), tmp_path / "mlx")
    model, tok = load(str(tmp_path / "mlx"))
    p = patterns[0]
    prompt = tok.encode(" ".join(f"t{p[i % len(p)]}" for i in range(12)))
    ref = plain_greedy(model, prompt, 40)
    toks, out = spec_tokens(model, prompt, 40)
    assert toks == ref
    # The drafter learned the base's own continuations: most drafts are accepted.
    assert len(toks) / out[-1][3] > 1.5


def test_medusa_layout_flags_are_checked_before_training(tmp_path):
    """``--medusa-lm-heads``/``--medusa-num-layers`` for ParallelSpec, or several blocks for
    the heads trained here, are refused by name before anything is read or written."""
    from convert.train_drafter import main as train_drafter

    for flags, match in (
        (["--kind", "parallelspec", "--medusa-lm-heads", "own"], "for --kind medusa"),
        (["--kind", "medusa", "--medusa-num-layers", "2"], "--medusa-num-layers 2"),
        (["--kind", "medusa", "--medusa-lm-heads", "own", "--medusa-num-layers", "0"],
         "--medusa-num-layers 0"),  # fmt: skip
    ):
        with pytest.raises(ValueError, match=match):
            train_drafter([*flags, "--model", str(tmp_path / "none"), "--data", "x.jsonl",
                           "--out", str(tmp_path / "out")])  # fmt: skip
        assert not (tmp_path / "out").exists()


def test_distillation_stops_at_its_time_limit_after_one_batch(tmp_path, capsys):
    """``convert.distill --time-limit``: past it no batch starts (one always runs), and the
    file holds what was generated by then and says so. Control: no limit, every example."""
    import json

    from hf_helpers import hf_tokenizer

    from convert.distill import main as distill

    V = 32
    with open(tmp_path / "train.jsonl", "w") as f:
        for i in range(20):
            f.write(json.dumps({"text": " ".join(f"t{(i + j) % 30}" for j in range(24))}) + "\n")
    hf_model("llama", vocab_size=V).save_pretrained(str(tmp_path / "base"))
    hf_tokenizer(V).save_pretrained(str(tmp_path / "base"))
    args = ["--model", str(tmp_path / "base"), "--data", str(tmp_path / "train.jsonl"),
            "--max-length", "24", "--window-prompt", "8", "--batch-size", "4"]  # fmt: skip
    distill([*args, "--out", str(tmp_path / "cut.jsonl"), "--time-limit", "0"])
    assert len((tmp_path / "cut.jsonl").read_text().splitlines()) == 4
    said = capsys.readouterr().out
    assert "wrote 4 examples" in said and "(time limit: 20 asked)" in said
    distill([*args, "--out", str(tmp_path / "all.jsonl")])
    assert len((tmp_path / "all.jsonl").read_text().splitlines()) == 20
