"""A draft vocabulary (``mlx_specstream.draft_vocab``): the drafter's head ranks only its
tokens. Golden counting and choice; restricted heads equal the full head's columns
(linear, tied, quantized, soft-capped, GPT-NeoX's ``embed_out``); every drafter then
drafts only those tokens while output stays plain decoding's, and sampling keeps the
distribution; ``load``/``save``/the CLIs read and write it; bad input is refused by name."""

import doctest
import json
from collections import Counter

import mlx.core as mx
import numpy as np
import pytest
from helpers import plain_greedy, spec_tokens, tiny_model, tiny_spec_model, word_tokenizer
from mlx.utils import tree_map

import mlx_specstream.draft_vocab as dv
from mlx_specstream import load
from mlx_specstream.config import DrafterConfig
from mlx_specstream.drafters import attach_drafter
from mlx_specstream.streams import StreamRuntime, attach_verifier, get_runtime
from mlx_specstream.utils import save

V = 64


def test_module_examples():
    result = doctest.testmod(dv)
    assert result.failed == 0 and result.attempted > 0, result


def test_counting_and_choosing_golden():
    counts = dv.count_tokens([[3, 1, 3], [], [1, 3, 0]], 5)
    assert counts.tolist() == [1, 2, 0, 3, 0]
    assert dv.frequent_tokens(counts, 2).tolist() == [1, 3]
    # ties go to the lower id; kept tokens first
    assert dv.frequent_tokens(np.array([2, 2, 2, 0]), 2).tolist() == [0, 1]
    assert dv.frequent_tokens(np.array([2, 2, 2, 0]), 2, keep=[3]).tolist() == [0, 3]
    assert dv.coverage(counts, np.array([1, 3])) == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match="token id 7 is outside"):
        dv.count_tokens([[1, 7]], 5)
    with pytest.raises(ValueError, match="size 6"):
        dv.frequent_tokens(counts, 6)
    with pytest.raises(ValueError, match="cannot hold the 2 tokens"):
        dv.frequent_tokens(counts, 1, keep=[0, 1])


def _ids(n=40, seed=0):
    return np.sort(np.random.default_rng(seed).choice(V, n, replace=False))


@pytest.mark.parametrize(
    "arch,bits",
    [("llama", None), ("qwen2", None), ("gemma2", None), ("gpt_neox", None),
     ("llama", 4), ("qwen2", 4)],
)  # fmt: skip
def test_a_restricted_head_gives_the_full_head_s_columns(arch, bits):
    """Untied ``lm_head``, tied embeddings (``as_linear``), Gemma 2's soft-capping after
    the head, GPT-NeoX's ``embed_out``, quantized heads and embeddings: the restricted
    tail equals the full tail's columns at the ids, ``-inf`` elsewhere. Control: the
    columns of other ids differ."""
    model = tiny_model(arch, vocab_size=V, quant_bits=bits)
    attach_verifier(model)
    rt = get_runtime(model)
    ids = _ids()
    dv.use_draft_vocab(model, ids)
    h = mx.random.normal((1, 3, model.args.hidden_size), key=mx.random.key(1))
    full, small = np.array(rt.head(h)), np.array(rt.head(h, draft=True))
    assert small.shape == full.shape
    np.testing.assert_allclose(small[..., ids], full[..., ids], rtol=1e-5, atol=1e-5)
    others = np.setdiff1d(np.arange(V), ids)
    assert np.isneginf(small[..., others]).all()
    assert not np.allclose(small[..., ids], full[..., _ids(seed=1)], atol=1e-3)
    # the head itself is back in place after a draft
    assert np.array_equal(np.array(rt.head(h)), full)


def _drafted_tokens(model, monkeypatch, prompt, n=40, **kwargs):
    """Greedy tokens, and every token drafted (each verified tree's nodes past its root)."""
    drafted, real = [], StreamRuntime.forward

    def recording(self, tokens, *args, **kw):
        drafted.extend(np.array(tokens).reshape(-1)[1:].tolist())
        return real(self, tokens, *args, **kw)

    monkeypatch.setattr(StreamRuntime, "forward", recording)
    toks, _ = spec_tokens(model, prompt, n, **kwargs)
    monkeypatch.undo()
    return toks, drafted


def _mtp_model(tmp_path, arch, own_head):
    from test_mtp import write_checkpoint

    write_checkpoint(tmp_path / "ckpt", arch, own_head=own_head, depths=3 if own_head else 1)
    return load(str(tmp_path / "ckpt"))[0]


def _model_of(kind, tmp_path):
    if kind.startswith("streams"):
        extra = {"streams-split": dict(stream_pass="split"),
                 "streams-in-pass": dict(stream_logits_in_pass=True)}.get(kind, {})  # fmt: skip
        return tiny_spec_model("llama", vocab_size=V, weight_scale=1.0, top_k=2, **extra)
    if kind in ("medusa", "parallelspec"):
        model = tiny_model("llama", vocab_size=V, weight_scale=1.0)
        cfg = DrafterConfig(kind=kind, num_draft_tokens=3, top_k=2, max_tree_nodes=10)
        drafter = attach_drafter(model, cfg, seed=0)
        if kind == "medusa":  # (heads at zero draft the model's own next token)
            drafter.update(tree_map(mx.zeros_like, drafter.parameters()))
        return model
    return _mtp_model(tmp_path, *{"mtp": ("mimo", False), "mtp-own-heads": ("step3p5", True)}[kind])


@pytest.mark.parametrize(
    "kind",
    ["streams", "streams-split", "streams-in-pass", "medusa", "parallelspec", "mtp",
     "mtp-own-heads"],
)  # fmt: skip
def test_drafts_come_from_the_vocabulary_and_output_stays_plain(kind, tmp_path, monkeypatch):
    """Without a draft vocabulary the drafter drafts some tokens (the control: those
    left out below); with one that leaves out the two it drafted most, it never drafts
    them, and greedy output still equals plain decoding."""
    model = _model_of(kind, tmp_path)
    prompt = [4, 8, 15, 16, 23]
    want = plain_greedy(model, prompt, 40)
    toks, drafted = _drafted_tokens(model, monkeypatch, prompt)
    assert toks == want
    common = [t for t, _ in Counter(drafted).most_common(2)]
    ids = np.setdiff1d(np.arange(V), common)
    dv.use_draft_vocab(model, ids)
    toks, drafted = _drafted_tokens(model, monkeypatch, prompt)
    assert toks == want
    assert drafted and not set(drafted) & set(common), (common, drafted)
    dv.use_draft_vocab(model, None)  # every token again
    assert _drafted_tokens(model, monkeypatch, prompt)[1].count(common[0]) > 0


@pytest.mark.parametrize("arch,own_head", [("mimo", False), ("step3p5", True)])
def test_an_mtp_layer_s_logits_are_its_full_ones_at_the_ids(arch, own_head, tmp_path):
    """Each MTP layer's head (the base's, tied here, or its own) restricted gives its
    full logits at the ids, ``-inf`` elsewhere. Control: other ids' columns differ."""
    model = _mtp_model(tmp_path, arch, own_head)
    vocab = dv.use_draft_vocab(model, _ids())
    out = mx.random.normal((2, model.args.hidden_size), key=mx.random.key(3))
    others = np.setdiff1d(np.arange(V), _ids())
    for depth in get_runtime(model).drafter.all_depths:
        assert ("head" in depth) == own_head
        full = np.array(depth.logits(model, out))
        small = np.array(depth.logits(model, out, vocab))
        np.testing.assert_allclose(small[:, _ids()], full[:, _ids()], rtol=1e-5, atol=1e-5)
        assert np.isneginf(small[:, others]).all()
        assert not np.allclose(small[:, _ids()], full[:, _ids(seed=1)], atol=1e-3)


def test_sampling_with_a_draft_vocabulary_keeps_the_distribution(monkeypatch):
    """Rejection sampling takes the drafts' distribution as zero outside the vocabulary;
    the output's distribution stays the model's. Control: drafts verified against the
    next level's distribution."""
    from chi_square import chi_square_pvalue
    from test_sampling import exact_distribution, sample_counts, verify_against_the_next_level_s_q

    from mlx_specstream.sample_utils import make_sampler

    model = tiny_model("llama", vocab_size=6, weight_scale=1.0, hidden_size=32,
                       intermediate_size=64)  # fmt: skip
    attach_drafter(model, DrafterConfig(kind="medusa", num_draft_tokens=2, top_k=2), seed=3)
    dv.use_draft_vocab(model, [0, 2, 3, 5])
    sampler, n = make_sampler(temp=1.0), 1500
    exact = exact_distribution(model, sampler)
    p = chi_square_pvalue(sample_counts(model, sampler, n, acceptance="rejection"), exact, n)
    assert p > 1e-3, f"chi-square p = {p:.2e}"
    verify_against_the_next_level_s_q(monkeypatch)
    p = chi_square_pvalue(sample_counts(model, sampler, n, acceptance="rejection"), exact, n)
    assert p < 1e-6, f"mismatched draft distributions passed (p = {p:.2e}): no power"


def _directory(tmp_path, name="model"):
    model = tiny_spec_model("llama", vocab_size=V, weight_scale=1.0, top_k=2)
    return save(tmp_path / name, model, word_tokenizer(V))


def test_load_takes_the_directory_s_vocabulary_and_save_writes_it(tmp_path):
    path = _directory(tmp_path)
    assert get_runtime(load(str(path))[0]).draft_vocab is None
    dv.save_draft_vocab(path / dv.FILE, _ids(), {})
    model, tok = load(str(path))
    assert np.array_equal(np.array(get_runtime(model).draft_vocab.ids), _ids())
    assert get_runtime(load(str(path), draft_vocab=False)[0]).draft_vocab is None
    other = dv.save_draft_vocab(tmp_path / "other.safetensors", _ids(20, seed=2), {})
    chosen = get_runtime(load(str(path), draft_vocab=str(other))[0]).draft_vocab
    assert np.array_equal(np.array(chosen.ids), _ids(20, seed=2))
    copy = save(tmp_path / "copy", model, tok)
    assert np.array_equal(np.array(mx.load(str(copy / dv.FILE))[dv.KEY]), _ids())
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        dv.save_draft_vocab(path / dv.FILE, _ids(), {})


def test_bad_vocabularies_are_refused_by_name(tmp_path):
    path = _directory(tmp_path)
    bad = tmp_path / "bad.safetensors"
    mx.save_safetensors(str(bad), {"ids": mx.array([1, 2])})
    with pytest.raises(
        ValueError, match=r"bad.safetensors: no 'token_ids' tensor \(it has \['ids'\]\)"
    ):
        load(str(path), draft_vocab=str(bad))
    far = dv.save_draft_vocab(tmp_path / "far.safetensors", np.array([3, V + 5]), {})
    with pytest.raises(ValueError, match=f"far.safetensors: token id {V + 5} is outside"):
        load(str(path), draft_vocab=str(far))
    twice = dv.save_draft_vocab(tmp_path / "twice.safetensors", np.array([3, 3]), {})
    with pytest.raises(ValueError, match="repeats a token id"):
        load(str(path), draft_vocab=str(twice))
    with pytest.raises(FileNotFoundError, match="missing.safetensors does not exist"):
        load(str(path), draft_vocab=str(tmp_path / "missing.safetensors"))
    from mlx_lm.utils import save_config, save_model

    plain, base = tmp_path / "plain", tiny_model("llama", vocab_size=V)
    plain.mkdir()
    save_model(plain, base)
    save_config({k: v for k, v in vars(base.args).items() if v is not None},
                plain / "config.json")  # fmt: skip
    word_tokenizer(V).save_pretrained(str(plain))
    vocab = dv.save_draft_vocab(tmp_path / "v.safetensors", _ids(), {})
    with pytest.raises(ValueError, match="has no drafter whose head ranks tokens"):
        load(str(plain), allow_plain=True, draft_vocab=str(vocab))
    assert get_runtime(load(str(plain), allow_plain=True)[0]).draft_vocab is None


def test_a_head_without_a_weight_of_its_own_is_refused_by_name():
    """A head wrapped by an adapter (mlx-lm's LoRA on ``lm_head``) has no rows to keep."""
    from mlx_lm.tuner.lora import LoRALinear

    vocab = dv.DraftVocab([1, 2], V, source="v.safetensors")
    lora = LoRALinear.from_base(tiny_model("llama", vocab_size=V).lm_head, r=4)
    with pytest.raises(ValueError, match="v.safetensors: .* this head is a LoRALinear"):
        vocab.restrict(lora)


def test_a_model_whose_logits_bypass_the_head_found_is_refused(monkeypatch):
    """Where the module swapped is not where the logits come from, they have every
    token's width: refused by name, never used unrestricted."""
    model = tiny_model("llama", vocab_size=V)
    attach_verifier(model)
    dv.use_draft_vocab(model, _ids())
    monkeypatch.setattr(dv, "head_path", lambda m: ("model", "embed_tokens"))
    h = mx.zeros((1, 1, model.args.hidden_size))
    with pytest.raises(ValueError, match="do not come from the module holding its LM head"):
        get_runtime(model).head(h, draft=True)


def test_the_command_counts_tokens_and_writes_a_new_file(tmp_path, capsys):
    path = _directory(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"text": " ".join(f"t{i % 5}" for i in range(200))}]
    (data / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (data / "valid.jsonl").write_text(json.dumps({"text": "t1 t2 t9 t1 t2 t9"}))
    out = tmp_path / "vocab.safetensors"
    dv.main(["--model", str(path), "--data", str(data), "--size", "8", "--out", str(out)])
    text = capsys.readouterr().out
    ids = np.array(mx.load(str(out))[dv.KEY]).tolist()
    # t0..t4 counted, the EOS (t63) kept, then the lowest uncounted ids
    assert ids == [0, 1, 2, 3, 4, 5, 6, V - 1]
    assert "cover 100.00% of them" in text and "60.00% of the held-out set's" in text
    assert np.array_equal(np.array(load(str(path), draft_vocab=str(out))[0]
                                   .speculative_streams.draft_vocab.ids), ids)  # fmt: skip
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        dv.main(["--model", str(path), "--data", str(data), "--out", str(out), "--size", "8"])
    with pytest.raises(ValueError, match=f"--size {V}: a draft vocabulary holds fewer tokens"):
        dv.main(["--model", str(path), "--data", str(data), "--size", str(V),
                 "--out", str(tmp_path / "x.safetensors")])  # fmt: skip
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty directory"):
        dv.main(["--model", str(path), "--data", str(empty), "--size", "8",
                 "--out", str(tmp_path / "y.safetensors")])  # fmt: skip


def test_the_generate_flag(tmp_path, capsys):
    from mlx_specstream.cli_args import draft_vocab_value
    from mlx_specstream.generate import main as generate_main

    assert draft_vocab_value("none") is False and draft_vocab_value("a.st") == "a.st"
    path = _directory(tmp_path)
    vocab = dv.save_draft_vocab(tmp_path / "v.safetensors", _ids(), {})
    generate_main(["--model", str(path), "--prompt", "t4 t8 t15", "--max-tokens", "8",
                   "--draft-vocab", str(vocab), "--tree-depth", "2"])  # fmt: skip
    assert "Generation: 8 tokens" in capsys.readouterr().out


@pytest.mark.parametrize("stream_pass", ["fused", "split"])
def test_a_batch_s_rows_draft_from_the_vocabulary_and_equal_each_prompt_alone(
    stream_pass, monkeypatch
):
    """Rows of a batch drafting with streams: every stream logit they draft from is
    ``-inf`` outside the vocabulary, and each row's tokens equal its prompt decoded
    alone. Control: without one, the rows' stream logits are finite everywhere."""
    from mlx_specstream.batch import batch_generate_step

    prompts, limits = [[3, 4, 5, 3, 4], [7, 8, 9, 10, 11, 7, 8], [2]], [20, 24, 16]
    model = tiny_spec_model("llama", vocab_size=V, num_streams=3, num_stream_layers=2,
                            stream_lora_rank=4)  # fmt: skip
    want = [plain_greedy(model, p, n) for p, n in zip(prompts, limits)]
    seen = []
    for name in ("fused_streams", "rows_streams"):
        real = getattr(StreamRuntime, name)

        def recording(self, *args, real=real, **kwargs):
            out = real(self, *args, **kwargs)
            seen.append(np.array(out.astype(mx.float32)))
            return out

        monkeypatch.setattr(StreamRuntime, name, recording)

    def run():
        seen.clear()
        tokens = [[] for _ in prompts]
        for out in batch_generate_step(model, prompts, max_tokens=limits, draft="streams",
                                       stream_pass=stream_pass, pipeline=False):  # fmt: skip
            for r in out:
                tokens[r.uid] += r.tokens
        return tokens

    assert run() == want and seen
    assert all(np.isfinite(s).all() for s in seen)  # (the control: every token ranked)
    ids = _ids()
    dv.use_draft_vocab(model, ids)
    assert run() == want and seen
    others = np.setdiff1d(np.arange(V), ids)
    assert all(np.isneginf(s[..., others]).all() and np.isfinite(s[..., ids]).all() for s in seen)


def test_on_a_hybrid_the_mtp_layer_s_chains_come_from_the_vocabulary(tmp_path, monkeypatch):
    """Qwen3-Next's MTP layer drafting chains (recurrent layers verify chains): every
    level it drafts is ``-inf`` outside the vocabulary, and greedy output equals mlx-lm's.
    Control: without one, every level is finite."""
    import mlx_specstream.mtp as mtp
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load as mlx_lm_load

    model = _mtp_model(tmp_path, "qwen3_next", False)
    plain, _ = mlx_lm_load(str(tmp_path / "ckpt"))
    prompt = [4, 8, 15, 16, 23]
    want = [t for (t, _), _ in zip(generate_step(mx.array(prompt), plain), range(24))]
    seen, real = [], mtp.MTPDrafter.draft

    def recording(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        seen.append(np.array(out.astype(mx.float32)))
        return out

    monkeypatch.setattr(mtp.MTPDrafter, "draft", recording)
    assert spec_tokens(model, prompt, 24, num_draft_tokens=2)[0] == want and seen
    assert all(np.isfinite(s).all() for s in seen)
    seen.clear()
    dv.use_draft_vocab(model, _ids())
    assert spec_tokens(model, prompt, 24, num_draft_tokens=2)[0] == want and seen
    others = np.setdiff1d(np.arange(V), _ids())
    assert all(np.isneginf(s[:, others]).all() and np.isfinite(s[:, _ids()]).all() for s in seen)


@pytest.mark.parametrize("stream_pass", ["fused", "split"])
def test_on_a_hybrid_the_streams_chains_come_from_the_vocabulary(stream_pass, monkeypatch):
    """Lossless streams on Qwen3-Next's shape (chains): every stream logit a chain is
    drafted from is ``-inf`` outside the vocabulary, and greedy output equals mlx-lm's.
    Control: without one, every logit is finite."""
    import mlx_specstream.recurrent as recurrent
    from helpers import stream_hybrid

    model = stream_hybrid(vocab_size=16)
    model.speculative_streams.split_streams = stream_pass == "split"
    prompt = [1, 2, 3, 4, 1, 2]
    want = plain_greedy(model, prompt, 20)
    seen, real = [], recurrent.level_scores

    def recording(logits, *args, **kwargs):
        seen.append(np.array(logits.astype(mx.float32)))
        return real(logits, *args, **kwargs)

    monkeypatch.setattr(recurrent, "level_scores", recording)
    assert spec_tokens(model, prompt, 20, num_draft_tokens=3)[0] == want and seen
    assert all(np.isfinite(s).all() for s in seen)
    seen.clear()
    ids = np.arange(0, 16, 2)
    dv.use_draft_vocab(model, ids)
    assert spec_tokens(model, prompt, 20, num_draft_tokens=3)[0] == want and seen
    odd = np.arange(1, 16, 2)
    assert all(np.isneginf(s[..., odd]).all() and np.isfinite(s[..., ids]).all() for s in seen)
