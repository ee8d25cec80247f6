"""The Hugging Face front-end (knnlm/hf), on tiny models built from configs (no download).

Every number is checked against a reference written here, never against the code under
test: keys against the block's own modules applied by hand, eval against the guide's loop
(HF's own loss, `labels` with -100), kNN-LM perplexity against brute-force numpy.
"""

import json
import math
import random
import sys
import types

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from knnlm.errors import ConfigError  # noqa: E402
from knnlm.hf import LAYERS, break_into, break_out  # noqa: E402
from knnlm.hf.cli import main  # noqa: E402
from knnlm.hf.generation import KNNLogitsProcessor  # noqa: E402
from knnlm.store import open_datastore  # noqa: E402

from .helpers import build_index  # noqa: E402

WORDS = "the a of to and in that it was he she her his had with for as not but be on at by".split()
ARCHS = ("gpt2", "gpt_neox", "llama", "mistral", "qwen2", "opt", "opt_postnorm")
ALL_KEYTYPES = ("last_ffn_input", "last_ffn_input_before_ln", "last_attn_input", "last_attn_input_before_ln",
                "decoder_output", "decoder_output_ln")


def config(arch, vocab):
    T, small = transformers, dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, vocab_size=vocab,
                                  max_position_embeddings=64)
    if arch == "gpt2":
        return T.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=vocab, n_positions=64, bos_token_id=1,
                            eos_token_id=1)
    if arch == "gpt_neox":
        return T.GPTNeoXConfig(intermediate_size=64, **small)
    if arch in ("llama", "mistral", "qwen2"):
        cls = {"llama": T.LlamaConfig, "mistral": T.MistralConfig, "qwen2": T.Qwen2Config}[arch]
        return cls(intermediate_size=64, num_key_value_heads=1, **small)
    return T.OPTConfig(ffn_dim=64, word_embed_proj_dim=32, do_layer_norm_before=arch == "opt", **small)


def tiny(arch="gpt2", vocab=30, seed=0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config(arch, vocab)).eval()
    with torch.no_grad():  # random norms and biases: a by-hand recomputation that skips one would fail
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    return model


def make_tokenizer(words):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(words)], trainers.WordLevelTrainer(special_tokens=["<unk>", "<eos>"]))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def text(n_lines, seed):
    rng = random.Random(seed)
    # Repeated phrases: a datastore over the train text helps on valid, so kNN-LM scores differ from the LM's.
    phrases = [" ".join(rng.choice(WORDS) for _ in range(6)) for _ in range(8)]
    return "\n".join(" ".join(rng.choice(phrases) if rng.random() < 0.5 else rng.choice(WORDS) for _ in range(5))
                     for _ in range(n_lines))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny GPT-2 and its tokenizer saved as a model directory, train and valid texts, another
    model (other weights) and another tokenizer (same size, ids permuted)."""
    root = tmp_path_factory.mktemp("hf")
    tok = make_tokenizer(WORDS)
    model = tiny("gpt2", len(tok), seed=0)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    tiny("gpt2", len(tok), seed=1).save_pretrained(root / "other_model")
    tok.save_pretrained(root / "other_model")
    make_tokenizer(WORDS + WORDS[-6:] * 3).save_pretrained(root / "other_tok")
    (root / "train.txt").write_text(text(40, 1))
    (root / "valid.txt").write_text(text(12, 2))
    (root / "short.txt").write_text("the")
    return types.SimpleNamespace(root=root, model=model, tok=tok, mdir=str(root / "model"))


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


# ----------------------------------------------------------------------------- references
def guide_windows(ids, max_length, stride):
    """The guide's loop: (input_ids, labels) per window, labels -100 where not scored."""
    seq_len, prev_end = ids.shape[1], 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end
        input_ids = ids[:, begin:end]
        labels = input_ids.clone()
        labels[:, :-trg_len] = -100
        yield input_ids, labels
        prev_end = end
        if end == seq_len:
            break


def guide_reference(model, tok, path, max_length, stride):
    """Per scored token, by the guide's procedure: keys (the FFN input, hooked here), targets,
    log p_LM; and the perplexity from HF's own loss weighted by each window's scored count."""
    ids = tok(open(path).read(), return_tensors="pt").input_ids
    block = model.transformer.h[-1]
    box = {}
    handle = block.mlp.register_forward_pre_hook(lambda m, a: box.__setitem__("k", a[0]))
    keys, targets, lps, nll_sum, count = [], [], [], 0.0, 0
    with torch.no_grad():
        for input_ids, labels in guide_windows(ids, max_length, stride):
            out = model(input_ids, labels=labels)
            shifted = labels[0, 1:]
            scored = shifted != -100
            n = int(scored.sum())
            if n == 0:
                continue
            nll_sum += float(out.loss) * n
            count += n
            keys.append(box["k"][0, :-1][scored])
            targets.append(shifted[scored])
            lps.append(out.logits[0, :-1][scored].float().log_softmax(-1).gather(-1, shifted[scored][:, None])[:, 0])
    handle.remove()
    return (torch.cat(keys).numpy(), torch.cat(targets).numpy(), torch.cat(lps).double().numpy(),
            math.exp(nll_sum / count), count)


def guide_code_ppl(model, tok, path, max_length, stride):
    """The guide's code as published: each window's mean loss weighted by its unmasked labels minus one."""
    ids = tok(open(path).read(), return_tensors="pt").input_ids
    nll_sum, n_tokens = 0.0, 0
    with torch.no_grad():
        for input_ids, labels in guide_windows(ids, max_length, stride):
            loss = model(input_ids, labels=labels).loss
            num_loss_tokens = int((labels != -100).sum()) - labels.size(0)
            nll_sum += float(loss) * num_loss_tokens
            n_tokens += num_loss_tokens
    return math.exp(nll_sum / n_tokens)


# ----------------------------------------------------------------------------- keys
def by_hand(model, arch, input_ids):
    """Every key type recomputed from the final block's modules, applied by hand to states
    recorded by plain hooks of this test (block input, attention output, block output)."""
    row = LAYERS["opt" if arch == "opt_postnorm" else arch]
    block = model.get_submodule(row.layers)[-1]
    attn, attn_norm = block.get_submodule(row.attn), block.get_submodule(row.attn_norm)
    ffn_norm = block.get_submodule(row.ffn_norm)
    box = {}
    hs = [block.register_forward_pre_hook(lambda m, a, kw: box.__setitem__("x", a[0] if a else kw["hidden_states"]),
                                          with_kwargs=True),
          attn.register_forward_hook(lambda m, a, o: box.__setitem__("a", o[0])),
          block.register_forward_hook(lambda m, a, o: box.__setitem__("out", o[0] if isinstance(o, tuple) else o))]
    with torch.no_grad():
        logits = model(input_ids).logits
    for h in hs:
        h.remove()
    x, a = box["x"], box["a"]
    with torch.no_grad():
        if arch == "opt" or arch == "opt_postnorm":
            mlp = lambda h: block.fc2(block.activation_fn(block.fc1(h)))  # noqa: E731
        else:
            mlp = block.mlp
        if arch == "gpt_neox":  # parallel residual: attention and FFN both read the block input
            before = x
            ffn_in = ffn_norm(x)
            out = mlp(ffn_in) + a + x
        elif arch == "opt_postnorm":
            before = x + a
            ffn_in = attn_norm(before)
            out = block.final_layer_norm(ffn_in + mlp(ffn_in))
        else:
            before = x + a
            ffn_in = ffn_norm(before)
            out = before + mlp(ffn_in)
        ref = {"last_ffn_input": ffn_in, "last_ffn_input_before_ln": before, "last_attn_input_before_ln": x,
               "decoder_output": out}
        if arch != "opt_postnorm":
            ref["last_attn_input"] = attn_norm(x)
            ref["decoder_output_ln"] = model.get_submodule(row.final_norm)(out)
            assert torch.allclose(model.get_output_embeddings()(ref["decoder_output_ln"]), logits, atol=1e-5)
    assert torch.allclose(out, box["out"], atol=1e-5)  # the by-hand block is the block
    return ref


@pytest.mark.parametrize("arch", ARCHS)
def test_keys_equal_the_state_recomputed_by_hand(arch):
    model = tiny(arch)
    ids = torch.randint(0, 30, (2, 9))
    ref = by_hand(model, arch, ids)
    with torch.no_grad():
        plain = model(ids).logits
    for keytype in ALL_KEYTYPES:
        if keytype not in ref:
            with pytest.raises(ConfigError, match=keytype):
                break_into(model, keytype)
            continue
        capture = break_into(model, keytype)
        with torch.no_grad():
            hooked = model(ids).logits
        keys = capture.pop()
        break_out(capture)
        assert keys.shape == (2, 9, 32), (arch, keytype)
        torch.testing.assert_close(keys, ref[keytype], atol=1e-5, rtol=0, msg=f"{arch} {keytype}")
        assert torch.equal(hooked, plain)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("arch", ARCHS)
def test_a_dump_without_the_lm_head_captures_the_same_keys(arch):
    """dump runs the base model only (run_windows lm=False): the hooks fire the same, per architecture."""
    from knnlm.hf.windows import run_windows, windows

    model = tiny(arch)
    ids = torch.randint(0, 30, (40,))
    wins = windows(len(ids), 16, 6)
    with break_into(model) as capture:
        full = list(run_windows(model, ids, wins, capture, batch_size=2))
        bare = list(run_windows(model, ids, wins, capture, batch_size=2, lm=False))
    assert model.base_model is not model and sum(len(r["targets"]) for r in bare) == sum(w.scored for w in wins)
    for f, b in zip(full, bare, strict=True):
        assert "lp_lm" not in b and torch.equal(f["targets"], b["targets"])
        torch.testing.assert_close(b["keys"], f["keys"], atol=1e-6, rtol=0, msg=arch)


def test_unknown_model_type_names_the_row_to_add():
    fake = types.SimpleNamespace(config=types.SimpleNamespace(model_type="mamba"))
    with pytest.raises(ConfigError, match=r"add a row for 'mamba' to LAYERS in knnlm/hf/layers\.py"):
        break_into(fake)
    with pytest.raises(ConfigError, match="--knn-keytype must be one of"):
        break_into(tiny("gpt2"), "ffn")


def test_break_out_restores_the_plain_model_exactly(setup):
    model = setup.model
    ids = torch.randint(0, len(setup.tok), (1, 12))
    with torch.no_grad():
        before = model(ids).logits.clone()
        with break_into(model) as capture:
            model(ids)
            assert capture.pop().shape == (1, 12, 32)
        after = model(ids).logits
    assert torch.equal(before, after)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


# ----------------------------------------------------------------------------- dump / eval
@pytest.mark.parametrize("max_length,stride", [(16, 6), (16, 16)])
def test_dump_rows_and_eval_at_lambda_0_follow_the_guide(setup, capsys, tmp_path, max_length, stride):
    keys, targets, lp, guide_ppl, count = guide_reference(setup.model, setup.tok, setup.root / "valid.txt",
                                                         max_length, stride)
    prefix = tmp_path / "ds"
    rc, out, err = run(capsys, "dump", "--model", setup.mdir, "--text", setup.root / "valid.txt", "--max-length",
                       max_length, "--stride", stride, "--dstore-mmap", prefix, "--batch-size", 3)
    assert rc == 0, err
    ds = open_datastore(str(prefix))
    assert ds.size == count
    np.testing.assert_array_equal(np.asarray(ds.vals), targets)
    np.testing.assert_allclose(np.asarray(ds.keys), keys, atol=1e-5, rtol=0)
    assert ds.meta["max_length"] == max_length and ds.meta["stride"] == stride and ds.meta["model"] == setup.mdir

    rc, out, err = run(capsys, "eval", "--model", setup.mdir, "--text", setup.root / "valid.txt", "--max-length",
                       max_length, "--stride", stride, "--json", tmp_path / "base.json")
    assert rc == 0, err
    result = json.loads((tmp_path / "base.json").read_text())
    assert result["tokens"] == count
    assert result["base_ppl"] == pytest.approx(guide_ppl, rel=1e-5)
    assert result["base_ppl"] == pytest.approx(math.exp(-lp.mean()), rel=1e-5)
    assert out.strip().splitlines()[-1].startswith(f"kNN-LM: {count:,} tokens, base LM perplexity ")
    # The guide's code weights windows after the first by one token too few when S < L (README).
    guide_code = guide_code_ppl(setup.model, setup.tok, setup.root / "valid.txt", max_length, stride)
    if stride < max_length:
        assert abs(guide_code / guide_ppl - 1) > 1e-6
    else:
        assert guide_code == pytest.approx(guide_ppl, rel=1e-6)

    build_index(str(prefix), str(tmp_path / "flat.index"), "Flat")
    rc, out, err = run(capsys, "eval", "--model", setup.mdir, "--text", setup.root / "valid.txt", "--max-length",
                       max_length, "--stride", stride, "--knnlm", "--dstore-filename", prefix, "--indexfile",
                       tmp_path / "flat.index", "--k", 4, "--lmbda", 0, "--json", tmp_path / "l0.json",
                       "--knn-allow-same-split")  # the dumped text itself: allowed here, refused otherwise
    assert rc == 0, err
    l0 = json.loads((tmp_path / "l0.json").read_text())
    assert l0["ppl"] == pytest.approx(guide_ppl, rel=1e-5) and l0["base_ppl"] == pytest.approx(guide_ppl, rel=1e-5)
    assert "(k=4, lambda=0.0, T=1.0, l2)" in out


def brute_force_ppl(ds_keys, ds_vals, queries, targets, lp_lm, k, lmbda, temp):
    d = ((queries[:, None, :].astype(np.float64) - ds_keys[None].astype(np.float64)) ** 2).sum(-1)
    nn = np.argsort(d, axis=1, kind="stable")[:, :k]
    s = -np.take_along_axis(d, nn, 1) / temp
    w = np.exp(s - s.max(1, keepdims=True))
    w /= w.sum(1, keepdims=True)
    p_knn = (w * (ds_vals[nn] == targets[:, None])).sum(1)
    return math.exp(-np.log(lmbda * p_knn + (1 - lmbda) * np.exp(lp_lm)).mean())


def test_knnlm_perplexity_equals_brute_force_and_tune_check_work(setup, capsys, tmp_path):
    prefix, index = tmp_path / "train", tmp_path / "train.index"
    assert run(capsys, "dump", "--model", setup.mdir, "--text", setup.root / "train.txt", "--max-length", 24,
               "--stride", 12, "--dstore-mmap", prefix)[0] == 0
    build_index(str(prefix), str(index), "Flat")
    ds = open_datastore(str(prefix))
    queries, targets, lp, _, _ = guide_reference(setup.model, setup.tok, setup.root / "valid.txt", 20, 10)
    k, lmbda, temp = 8, 0.3, 2.0
    ref = brute_force_ppl(np.asarray(ds.keys), np.asarray(ds.vals), queries, targets, lp, k, lmbda, temp)
    rc, out, err = run(capsys, "eval", "--model", setup.mdir, "--text", setup.root / "valid.txt", "--max-length", 20,
                       "--stride", 10, "--knnlm", "--dstore-filename", prefix, "--indexfile", index, "--k", k,
                       "--lmbda", lmbda, "--knn-temp", temp, "--json", tmp_path / "r.json",
                       "--knnlm-dump-probs", tmp_path / "export")
    assert rc == 0, err
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["ppl"] == pytest.approx(ref, rel=1e-5)
    assert abs(result["ppl"] - result["base_ppl"]) > 1e-3  # the datastore does change the scores
    assert f"kNN-LM perplexity {result['ppl']:.4f} (k=8, lambda=0.3, T=2.0, l2)" in out

    from knnlm.offline.tune import main as tune_main

    assert tune_main([str(tmp_path / "export"), "--json", str(tmp_path / "best.json")]) == 0
    best = json.loads((tmp_path / "best.json").read_text())
    assert best["count"] == len(targets)
    capsys.readouterr()

    rc, out, err = run(capsys, "check", "--dstore-filename", prefix, "--indexfile", index)
    assert rc == 0, out + err
    assert "PASS  keys recomputed" in out and "PASS  values = targets" in out and "PASS  model weights" in out
    rc, out, err = run(capsys, "check", "--dstore-filename", prefix, "--model", setup.root / "other_model")
    assert rc == 1 and "FAIL  model weights" in out and "FAIL  keys recomputed" in out


# ----------------------------------------------------------------------------- generation / API
@pytest.fixture(scope="module")
def small_store(setup, tmp_path_factory):
    d = tmp_path_factory.mktemp("store")
    assert main(["dump", "--model", setup.mdir, "--text", str(setup.root / "train.txt"), "--max-length", "24",
                 "--stride", "12", "--dstore-mmap", str(d / "ds")]) == 0
    build_index(str(d / "ds"), str(d / "ds.index"), "Flat")
    return str(d / "ds"), str(d / "ds.index")


def test_generation_distribution_sums_to_one_and_generate_runs(setup, small_store):
    from knnlm import KNNLM, FaissRetriever

    model = setup.model
    store = open_datastore(small_store[0])
    knn = KNNLM(FaissRetriever(small_store[1], store, k=8), lmbda=0.5, temperature=1.0)
    prompt = setup.tok("the a of to", return_tensors="pt").input_ids
    with break_into(model) as capture:
        with torch.no_grad():
            logits = model(prompt).logits[:, -1]
        dist = KNNLogitsProcessor(knn, capture)(prompt, logits)
    assert torch.allclose(dist.exp().sum(-1), torch.ones(1), atol=1e-5)
    assert not torch.allclose(dist, logits.log_softmax(-1), atol=1e-3)
    with torch.no_grad():
        plain_greedy = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for kwargs in ({"do_sample": False}, {"do_sample": True, "top_k": 0}, {"num_beams": 3, "do_sample": False}):
        with break_into(model) as capture:
            torch.manual_seed(0)
            with torch.no_grad():
                out = model.generate(prompt, max_new_tokens=6, logits_processor=[KNNLogitsProcessor(knn, capture)],
                                     pad_token_id=0, **kwargs)
        assert out.shape == (1, prompt.shape[1] + 6), kwargs
    knn0 = KNNLM(FaissRetriever(small_store[1], store, k=8), lmbda=0.0)
    with break_into(model) as capture, torch.no_grad():
        greedy0 = model.generate(prompt, max_new_tokens=6, logits_processor=[KNNLogitsProcessor(knn0, capture)],
                                 do_sample=False, pad_token_id=0)
    assert torch.equal(greedy0, plain_greedy)


def test_attach_makes_forward_the_knnlm_and_detach_restores_it(setup, small_store):
    import knnlm.hf

    model = setup.model
    ids = setup.tok(open(setup.root / "valid.txt").read(), return_tensors="pt").input_ids[:, :20]
    with torch.no_grad():
        plain = model(ids).logits.clone()
    knn = knnlm.hf.attach(model, small_store[0], small_store[1], k=8, lmbda=0.4, tokenizer=setup.tok)
    with torch.no_grad():
        out = model(ids, labels=ids)
    assert torch.allclose(out.logits.exp().sum(-1), torch.ones(1, 20), atol=1e-5)
    # The loss is the mean NLL of the interpolated distribution (reference: the same from log-probs by hand).
    ref = -out.logits[0, :-1].gather(-1, ids[0, 1:, None]).mean()
    assert float(out.loss) == pytest.approx(float(ref), rel=1e-6)
    with torch.no_grad():
        gen = model.generate(ids[:, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert gen.shape == (1, 7)
    knn.detach()
    assert "forward" not in model.__dict__
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain)


# ----------------------------------------------------------------------------- refusals
def test_datastore_of_another_model_or_tokenizer_is_refused_by_name(setup, capsys, small_store):
    prefix, index = small_store
    base = ["eval", "--text", setup.root / "valid.txt", "--max-length", 16, "--stride", 8, "--knnlm",
            "--dstore-filename", prefix, "--indexfile", index, "--k", 4]
    rc, _, err = run(capsys, *base, "--model", setup.root / "other_model")
    assert rc == 2 and err.startswith("knnlm-hf: error: datastore") and "different model weights" in err
    assert "--knn-allow-model-mismatch" in err
    assert run(capsys, *base, "--model", setup.root / "other_model", "--knn-allow-model-mismatch")[0] == 0
    rc, _, err = run(capsys, *base, "--model", setup.mdir, "--tokenizer", setup.root / "other_tok")
    assert rc == 2 and "was dumped with another dictionary" in err
    rc, _, err = run(capsys, *base, "--model", setup.mdir, "--knn-keytype", "decoder_output")
    assert rc == 2 and "holds 'last_ffn_input' keys but 'decoder_output' was requested" in err


BAD = {
    "lmbda 1.5": (["--lmbda", "1.5"], "--lmbda must lie in [0, 1], got 1.5"),
    "knn-temp 0": (["--knn-temp", "0"], "--knn-temp must be a positive finite number"),
    "k 0": (["--k", "0"], "--k must be at least 1, got 0"),
    "k > size": (["--k", "100000"], "--k 100000 exceeds the"),
    "probe 0": (["--probe", "0"], "--probe must be at least 1, got 0"),
    "k-factor 0.5": (["--knn-k-factor", "0.5"], "--knn-k-factor must be a finite number >= 1"),
    "k-factor without recompute": (["--knn-k-factor", "2", "--knn-sim-func", "do_not_recomp_l2"],
                                   "needs --knn-sim-func l2 or dot"),
    "sim-func": (["--knn-sim-func", "cosine"], "--knn-sim-func must be one of l2, do_not_recomp_l2, dot"),
    "keytype": (["--knn-keytype", "ffn"], "--knn-keytype must be one of"),
    "no indexfile": (["--indexfile", ""], "--knnlm needs both --dstore-filename PREFIX and --indexfile INDEX"),
    "missing datastore": (["--dstore-filename", "/nonexistent/ds"], "keys file /nonexistent/ds_keys.npy is missing"),
    "missing index": (["--indexfile", "/nonexistent/x.index"], "index /nonexistent/x.index is missing"),
    "stride > max-length": (["--stride", "20"], "--stride must lie in [1, --max-length 16]"),
    "max-length > positions": (["--max-length", "65"], "--max-length 65 exceeds the model's 64 positions"),
    "max-length 1": (["--max-length", "1"], "--max-length must be at least 2"),
    "text too short": (["--text", "SHORT"], "is 1 token(s) long: no token to score"),
    "missing text": (["--text", "/nonexistent.txt"], "text file /nonexistent.txt not found"),
    "missing model": (["--model", "/nonexistent_model"], "cannot load the tokenizer /nonexistent_model"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_refused_by_name(setup, capsys, small_store, case):
    extra, message = BAD[case]
    opts = {"--model": setup.mdir, "--text": str(setup.root / "valid.txt"), "--max-length": "16", "--stride": "8",
            "--dstore-filename": small_store[0], "--indexfile": small_store[1], "--k": "4"}
    flags = []
    for i in range(0, len(extra), 2):
        value = str(setup.root / "short.txt") if extra[i + 1] == "SHORT" else extra[i + 1]
        if extra[i] in opts:
            opts[extra[i]] = value
        else:
            flags += [extra[i], value]
    argv = ["eval", "--knnlm"] + [x for kv in opts.items() for x in kv] + flags
    rc, out, err = run(capsys, *argv)
    assert rc == 2, (case, out, err)
    assert err.startswith("knnlm-hf: error: ") and message in err, (case, err)


def test_dump_refusals(setup, capsys, small_store, tmp_path):
    rc, _, err = run(capsys, "dump", "--model", setup.mdir, "--text", setup.root / "valid.txt", "--max-length", 16,
                     "--dstore-mmap", small_store[0])
    assert rc == 2 and "a complete datastore already exists at" in err and "--overwrite" in err
    rc, _, err = run(capsys, "eval", "--model", setup.mdir, "--text", setup.root / "valid.txt",
                     "--knnlm-dump-probs", tmp_path / "e")
    assert rc == 2 and "--knnlm-dump-probs exports a kNN-LM evaluation: add --knnlm" in err
    other = tmp_path / "other"
    assert run(capsys, "dump", "--model", setup.mdir, "--text", setup.root / "valid.txt", "--max-length", 16,
               "--dstore-mmap", other)[0] == 0
    rc, _, err = run(capsys, "eval", "--model", setup.mdir, "--text", setup.root / "valid.txt", "--max-length", 16,
                     "--knnlm", "--dstore-filename", other, "--indexfile", small_store[1], "--k", 4)
    assert rc == 2 and "was built from datastore" in err


def test_console_script_prints_the_error_and_exits_2(setup, tmp_path):
    import subprocess

    r = subprocess.run([sys.executable, "-m", "knnlm.hf.cli", "eval", "--model", setup.mdir, "--text",
                        str(setup.root / "valid.txt"), "--knnlm"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == "knnlm-hf: error: --knnlm needs both --dstore-filename PREFIX and --indexfile INDEX"


def test_knnlm_build_index_works_on_an_hf_datastore(setup, capsys, small_store, tmp_path):
    from knnlm.index.builder import main as build_main

    index = tmp_path / "ivfpq.index"
    assert build_main([f"dstore_mmap={small_store[0]}", f"faiss_index={index}", "ncentroids=8", "code_size=8",
                       "num_keys_to_train=1000"]) == 0
    rc, out, err = run(capsys, "eval", "--model", setup.mdir, "--text", setup.root / "valid.txt", "--max-length", 16,
                       "--knnlm", "--dstore-filename", small_store[0], "--indexfile", index, "--k", 8, "--probe", 4)
    assert rc == 0, err
    assert "(k=8, lambda=0.25, T=1.0, l2)" in out


@pytest.mark.parametrize("mode", [[], ["--do-sample", "--top-k", "5"], ["--num-beams", "3"]])
def test_generate_command_greedy_sampling_beam(setup, capsys, small_store, mode):
    rc, out, err = run(capsys, "generate", "--model", setup.mdir, "--prompt", "the a of", "--max-new-tokens", 4,
                       "--knnlm", "--dstore-filename", small_store[0], "--indexfile", small_store[1], "--k", 8, *mode)
    assert rc == 0, err
    words = out.strip().split()
    assert words[:3] == ["the", "a", "of"] and 3 <= len(words) <= 7 and set(words) <= set(WORDS) | {"<eos>", "<unk>"}


def test_the_hf_front_end_imports_no_fairseq():
    import ast
    from pathlib import Path

    for path in (Path(__file__).resolve().parent.parent / "knnlm" / "hf").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            assert not any(n.split(".")[0] in ("fairseq", "fairseq_cli", "fairseq_plugins") for n in names), path


def test_eval_of_the_text_the_datastore_was_dumped_from_is_refused_by_content(setup, capsys, small_store):
    """knnlm-hf eval had no same-text check (issue 29): the dumped text scored 63.82 -> 24.43."""
    prefix, index = small_store
    base = ["eval", "--model", setup.mdir, "--max-length", 24, "--stride", 12, "--knnlm", "--dstore-filename", prefix,
            "--indexfile", index, "--k", 4]
    rc, _, err = run(capsys, *base, "--text", setup.root / "train.txt")
    assert rc == 2 and err.startswith(f"knnlm-hf: error: text {setup.root / 'train.txt'} is the text datastore"), err
    assert "--knn-allow-same-split" in err
    rc, out, _ = run(capsys, *base, "--text", setup.root / "train.txt", "--knn-allow-same-split")
    assert rc == 0 and "kNN-LM perplexity" in out
    assert run(capsys, *base, "--text", setup.root / "valid.txt")[0] == 0
