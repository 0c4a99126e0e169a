"""More of mlx-lm's architectures decode exactly through the verifier: mixtures of
experts (Qwen3-MoE, Mixtral, GLM-4.5, Llama 4), latent attention (DeepSeek V2/V3,
MiniCPM3, Mistral 4), layers without RoPE beside layers with it (SmolLM3, EXAONE 4,
Llama 4), RoPE one module deeper (EXAONE), the position-scaled attention of Ministral
3 and Mistral 4, absolute position embeddings (GPT-2, StarCoder), and the vision-language wrappers whose language model mlx-lm loads
(Gemma 3, Mistral 3, Pixtral, Qwen3-VL, Kimi-VL)."""

import mlx.core as mx
import pytest
from helpers import CHAIN_ARGS, MORE, plain_greedy, spec_tokens, tiny_model, tiny_spec_model
from test_batch import LIMITS, alone, decode
from mlx_lm.models import ministral3

import mlx_specstream.streams as streams
from mlx_specstream.attention_masks import llama4_attention_scale
from mlx_specstream.model_parts import hidden_size
from mlx_specstream.streams import attach_verifier
from mlx_specstream.support import TreeUnsupported

PROMPT = [3, 1, 4, 1, 5, 2, 6, 3, 1, 4]  # (repeats: lookup drafts from the first step)
N = 48  # (past position 8, where the tiny Ministral 3's attention scale first steps)


@pytest.mark.parametrize("arch", MORE)
def test_lookup_drafts_equal_plain(arch):
    model = tiny_model(arch, vocab_size=8)
    want = plain_greedy(model, PROMPT, N)
    got, records = spec_tokens(model, PROMPT, N, draft="ngram", num_draft_tokens=4,
                               pipeline=True)  # fmt: skip
    assert got == want
    assert sum(r[2] for r in records) > 5, "no lookup draft accepted: the test has no power"


@pytest.mark.parametrize("arch", MORE)
def test_stream_trees_equal_plain(arch):
    model = tiny_spec_model(arch, vocab_size=8, num_streams=3, top_k=2)
    want = plain_greedy(model, PROMPT, N)
    got, records = spec_tokens(model, PROMPT, N, max_tree_nodes=6)
    assert got == want
    assert len({r[3] for r in records}) < N - 5, "no draft accepted: the test has no power"


def test_the_wrappers_hidden_size_is_their_language_models():
    assert hidden_size(tiny_model("gemma3", vocab_size=8)) == 64
    assert hidden_size(tiny_model("mistral3", vocab_size=8)) == 64


def test_llama4_attention_scale_is_mlx_lms_floats():
    """(Its worked example runs with the module's, in test_sliding_window.)"""
    pos = mx.arange(0, 70000, 7, dtype=mx.int32)
    want = ministral3._get_llama_4_attn_scale(1, pos, 0.1, 16384).reshape(-1)
    assert mx.array_equal(llama4_attention_scale(pos, 0.1, 16384), want)


@pytest.mark.parametrize("arch", ["ministral3", "mistral3", "mistral4"])
@pytest.mark.parametrize("kwargs", [dict(max_tree_nodes=6), dict(max_tree_nodes=6, pipeline=True)])
def test_negative_control_trees_with_the_models_own_attention_scale(arch, kwargs, monkeypatch):
    """Tree rows sit past their positions: scaled at the pass's row indices, as the
    model scales them, the output changes."""
    model = tiny_spec_model(arch, vocab_size=8, num_streams=3, top_k=2)
    want = plain_greedy(model, PROMPT, N)
    assert spec_tokens(model, PROMPT, N, **kwargs)[0] == want
    monkeypatch.setattr(
        streams.StreamRuntime, "_attention_scale",
        lambda self, i, layer, x, given: mx.ones((x.shape[1], 1), x.dtype),
    )  # fmt: skip
    assert spec_tokens(model, PROMPT, N, **kwargs)[0] != want


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(draft="ngram", num_draft_tokens=3, pipeline=True),
        dict(draft="streams", stream_pass="fused", pipeline=True),
        dict(draft="streams", stream_pass="split", pipeline=False),
    ],
)
def test_ministral3_batch_rows_equal_each_prompt_alone(kwargs, monkeypatch):
    model = tiny_spec_model("ministral3", vocab_size=16, seed=1, num_streams=3)
    want = alone(model)  # (test_batch's prompts, each decoded alone)
    got, passes = decode(model, **kwargs)
    assert got == want
    assert passes < max(LIMITS)
    if kwargs["draft"] == "streams":  # (stream rows sit past the model's positions)
        monkeypatch.setattr(
            streams.StreamRuntime, "_attention_scale",
            lambda self, i, layer, x, given: mx.ones((x.shape[1], 1), x.dtype),
        )  # fmt: skip
        assert decode(model, **kwargs)[0] != want


def test_ministral3_target_and_draft_model():
    model = tiny_model("ministral3", vocab_size=8)
    draft = tiny_model("ministral3", vocab_size=8, seed=3)
    want = plain_greedy(model, PROMPT, N)
    assert spec_tokens(model, PROMPT, N, draft_model=draft, num_draft_tokens=3)[0] == want
    got, records = spec_tokens(model, PROMPT, N, draft_model=model, num_draft_tokens=3)
    assert got == want and len({r[3] for r in records}) == N // 4  # (a copy: all accepted)


def test_layers_without_rope_that_do_not_say_so_are_refused():
    """A layer without a RoPE module is a NoPE layer only if its attention says
    ``use_rope`` False (or the model adds position embeddings to its inputs, as
    GPT-2's, which the tree sets); otherwise positions could come from elsewhere."""
    model = tiny_model("exaone4", vocab_size=8)
    attn = model.layers[3].self_attn
    assert attn.use_rope is False and "rope" not in attn
    del attn.use_rope
    with pytest.raises(TreeUnsupported, match="layer 3 has no attention with a RoPE module"):
        attach_verifier(model)


@pytest.mark.parametrize("arch", ["gpt2", "gpt_bigcode"])
def test_negative_control_absolute_positions_of_the_rows_indices(arch, monkeypatch):
    """GPT-2's and StarCoder's position embeddings take the tree's positions: at the
    model's own (the rows' indices past the offset), trees decode otherwise."""
    monkeypatch.setattr(streams.StreamRuntime, "_positions_call", lambda self, base: base)
    model = tiny_spec_model(arch, vocab_size=8, num_streams=3, top_k=2)
    want = plain_greedy(model, PROMPT, N)
    assert spec_tokens(model, PROMPT, N, max_tree_nodes=6)[0] != want


@pytest.mark.parametrize("kwargs", [dict(draft="ngram", num_draft_tokens=3),
                                    dict(draft="streams", stream_pass="fused")])  # fmt: skip
def test_gpt2_batch_rows_equal_each_prompt_alone(kwargs):
    """A batch's rows sit at their own offsets: GPT-2 embeds each row's positions
    itself (its offsets an array), and the rows' drafts are verified as chains."""
    model = tiny_spec_model("gpt2", vocab_size=16, seed=1, num_streams=3)
    got, passes = decode(model, **kwargs)
    assert got == alone(model) and passes < max(LIMITS)


def test_hunyuan_with_cross_layer_attention_looks_up_and_refuses_streams():
    """Hunyuan's odd layers reading the layer below's key and value projections (CLA):
    prompt lookup gives mlx-lm's tokens, and streams are refused with the reason."""
    model = tiny_model("hunyuan", vocab_size=8, use_cla=True)
    got, records = spec_tokens(model, PROMPT, N, draft="ngram", num_draft_tokens=4)
    assert got == plain_greedy(model, PROMPT, N) and sum(r[2] for r in records) > 5
    with pytest.raises(ValueError, match="cross-layer attention"):
        tiny_spec_model("hunyuan", vocab_size=8, model_args=dict(use_cla=True))


@pytest.mark.parametrize(
    "arch, message",
    [
        ("phi3small", "adds its boolean causal mask"),
        ("minimax_m3_vl", "places its queries"),
        ("muse_spark", "fused Metal kernel"),
    ],
)
def test_models_whose_passes_cannot_equal_their_decoding_are_refused(arch, message):
    from mlx_specstream.streams import attach_verifier

    args = dict(
        phi3small=dict(
            dense_attention_every_n_layers=2, ff_intermediate_size=64, gegelu_limit=20.0,
            layer_norm_epsilon=1e-5, num_key_value_heads=2, blocksparse_block_size=32,
            blocksparse_num_local_blocks=1, blocksparse_vert_stride=2,
        ),
        minimax_m3_vl=CHAIN_ARGS["minimax_m3_vl"],
        muse_spark=dict(text_config=dict(  # (window, full and NoPE layers, experts)
            hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            num_hidden_layers=4, rms_norm_eps=1e-6, post_norm_eps=1e-6,
            rope_parameters={"rope_theta": 10000.0},
            layer_rope_theta=[10000.0, 10000.0, 10000.0, 0],
            layer_types=["sliding_attention", "full_attention"] * 2, sliding_window=8,
            final_logit_softcapping=30.0, output_multiplier=1.0, num_local_experts=4,
            num_experts_per_tok=2, moe_hidden_size=32, moe_intermediate_size=32,
        )),
    )[arch]  # fmt: skip
    from helpers import BASE, random_model

    # (Phi-3-small's head writes at its tokenizer's dummy ids: a vocabulary past them)
    model = random_model(arch, {**BASE, **args}, 100352 if arch == "phi3small" else 8)
    with pytest.raises(ValueError, match=message):
        attach_verifier(model)


def test_layers_called_with_other_arguments_before_the_mask_are_refused_with_the_reason():
    """The tree's masks go to a layer by position: a layer taking something else
    before its mask, other than Ministral 3's attention scale, is refused by the tree
    verifier."""
    model = tiny_model("llama", vocab_size=8)
    base = type(model.layers[0])

    class Layer(base):
        def __call__(self, x, gate=None, mask=None, cache=None):
            return base.__call__(self, x, mask, cache)

    for layer in model.layers:
        layer.__class__ = Layer
    with pytest.raises(TreeUnsupported, match=r"layer 0 \(Layer\) takes \(x, gate, mask, cache\)"):
        attach_verifier(model)


def test_negative_control_phixtral_trees_with_positions_one_further(monkeypatch):
    """Phixtral's attention is its layers' ``mixer``: its RoPE takes the tree's positions
    (test_stream_trees_equal_plain). Control: positions one further decode otherwise."""
    positions = streams.StreamRuntime._positions

    def shifted(self, i):
        pos = positions(self, i)
        return None if pos is None else pos + 1

    monkeypatch.setattr(streams.StreamRuntime, "_positions", shifted)
    model = tiny_spec_model("phixtral", vocab_size=8, num_streams=3, top_k=2)
    assert spec_tokens(model, PROMPT, N, max_tree_nodes=6)[0] != plain_greedy(model, PROMPT, N)
