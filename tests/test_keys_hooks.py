"""KeyCapture (fairseq_plugins/hooks.py), in process, on tiny untrained fairseq transformer LMs.

Every key type is compared with the state computed by hand from the decoder's
`inner_states` and the final layer's submodules (tests/helpers.hand_states, which checks
that its recomputation reproduces the layer's output), on a right-padded batch, for a
pre-norm LM with and without the final LayerNorm and a post-norm LM.
"""

import argparse
from types import SimpleNamespace

import pytest
import torch

from fairseq_plugins.hooks import KEYTYPES, KeyCapture, key_dim
from knnlm.errors import ConfigError

from .helpers import hand_states

DIM = 16
PAD_LENGTHS = (11, 7, 1)  # right padding as in a fairseq batch; one row of a single token


def build_lm(normalize_before, final_norm=True, seed=0):
    from fairseq.data import Dictionary
    from fairseq.models.transformer_lm import TransformerLanguageModel, base_lm_architecture

    d = Dictionary()
    for w in "the cat sat on a mat and dog ran to big red".split():
        d.add_symbol(w)
    args = argparse.Namespace(
        decoder_layers=2, decoder_embed_dim=DIM, decoder_ffn_embed_dim=24, decoder_attention_heads=2,
        tokens_per_sample=32, decoder_normalize_before=normalize_before,
        no_decoder_final_norm=not final_norm, dropout=0.3, attention_dropout=0.3, activation_dropout=0.3,
    )
    base_lm_architecture(args)
    args.decoder_normalize_before = normalize_before  # base_lm_architecture forces pre-norm
    torch.manual_seed(seed)
    model = TransformerLanguageModel.build_model(args, SimpleNamespace(source_dictionary=d, target_dictionary=d))
    # Untrained LayerNorms are the identity (weight 1, bias 0): perturb them so that "before" and
    # "after" a LayerNorm differ by more than a normalisation, and so do all the key types.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    model.eval()
    assert all(layer.normalize_before == normalize_before for layer in model.decoder.layers)
    assert (model.decoder.layer_norm is not None) == (normalize_before and final_norm)
    return model, d


@pytest.fixture(scope="module")
def models():
    return {
        "pre-norm": build_lm(True),
        "pre-norm, no final norm": build_lm(True, final_norm=False),
        "post-norm": build_lm(False),
    }


def batch(d, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = max(PAD_LENGTHS)
    tokens = torch.full((len(PAD_LENGTHS), T), d.pad(), dtype=torch.long)
    for i, n in enumerate(PAD_LENGTHS):
        tokens[i, :n] = torch.randint(d.nspecial, len(d), (n,), generator=g)
    tokens[:, 0] = d.eos()
    return tokens, tokens.ne(d.pad())


CASES = [(m, k) for m in ("pre-norm", "pre-norm, no final norm", "post-norm") for k in KEYTYPES
         if (m, k) != ("pre-norm, no final norm", "decoder_output_ln")]


@pytest.mark.parametrize("which,keytype", CASES)
def test_captured_key_equals_hand_computed_state(models, which, keytype):
    model, d = models[which]
    tokens, real = batch(d)
    cap = KeyCapture(model, keytype)
    try:
        with torch.no_grad():
            model(tokens)  # the full forward, as fairseq's SequenceScorer runs it
        keys = cap.pop()
    finally:
        cap.remove()
    want = hand_states(model, tokens)[keytype]
    assert keys.shape == (tokens.size(0), tokens.size(1), DIM)  # (B, T, C) like the targets
    assert not keys.requires_grad
    torch.testing.assert_close(keys[real], want[real], atol=1e-6, rtol=1e-5)


def test_key_types_are_distinct_states(models):
    """The hand-computed states differ where the architecture says they must (else the test above could not fail)."""
    for which, (model, d) in models.items():
        tokens, real = batch(d, seed=1)
        st = {k: v[real] for k, v in hand_states(model, tokens).items() if v is not None}
        same = set()
        if which == "post-norm":
            # a post-norm layer's input is already normalised and its output is normalised
            same = {frozenset(("last_attn_input", "last_attn_input_before_ln")),
                    frozenset(("decoder_output", "decoder_output_ln"))}
        for a in st:
            for b in st:
                if a < b:
                    equal = torch.allclose(st[a], st[b], atol=1e-4)
                    assert equal == (frozenset((a, b)) in same), (which, a, b)


def test_every_forward_replaces_the_key_and_pop_empties_it(models):
    model, d = models["pre-norm"]
    tokens, real = batch(d)
    want = hand_states(model, tokens)["last_ffn_input"]  # before hooking: hand_states runs the decoder
    cap = KeyCapture(model, "last_ffn_input")
    try:
        with torch.no_grad():
            model(tokens[:1, :5])
            model(tokens)
        keys = cap.pop()
        assert keys.shape[:2] == tokens.shape  # the second forward's state, not the first's
        torch.testing.assert_close(keys[real], want[real])
        with pytest.raises(RuntimeError, match="did not fire"):
            cap.pop()
    finally:
        cap.remove()


def test_remove_detaches_the_hook(models):
    model, d = models["post-norm"]
    tokens, _ = batch(d)
    cap = KeyCapture(model, "decoder_output")
    cap.remove()
    with torch.no_grad():
        model(tokens)
    assert cap.keys is None
    with pytest.raises(RuntimeError):
        cap.pop()


def test_two_captures_on_one_model_see_their_own_state(models):
    model, d = models["pre-norm"]
    tokens, real = batch(d)
    want = hand_states(model, tokens)
    caps = {k: KeyCapture(model, k) for k in ("last_ffn_input", "decoder_output_ln")}
    try:
        with torch.no_grad():
            model(tokens)
        for k, cap in caps.items():
            torch.testing.assert_close(cap.pop()[real], want[k][real], atol=1e-6, rtol=1e-5)
    finally:
        for cap in caps.values():
            cap.remove()


def test_key_dim_is_the_ffn_input_width(models):
    for model, _ in models.values():
        assert key_dim(model) == DIM


@pytest.mark.parametrize("bad", ["last_ffn_output", "", "LAST_FFN_INPUT", "decoder_output_ln "])
def test_invalid_key_type_is_a_config_error(models, bad):
    model, _ = models["pre-norm"]
    with pytest.raises(ConfigError, match="--knn-keytype must be one of"):
        KeyCapture(model, bad)


def test_decoder_output_ln_without_final_norm_is_a_config_error(models):
    model, _ = models["pre-norm, no final norm"]
    with pytest.raises(ConfigError, match="no final LayerNorm"):
        KeyCapture(model, "decoder_output_ln")
    # and nothing was left hooked: a later capture of another type works alone
    tokens, real = batch(models["pre-norm, no final norm"][1])
    want = hand_states(model, tokens)["decoder_output"]
    cap = KeyCapture(model, "decoder_output")
    try:
        with torch.no_grad():
            model(tokens)
        torch.testing.assert_close(cap.pop()[real], want[real])
    finally:
        cap.remove()


def test_model_without_transformer_layers_is_a_config_error():
    with pytest.raises(ConfigError, match="decoder.layers"):
        KeyCapture(torch.nn.Linear(4, 4), "last_ffn_input")
