"""The plugin follows fairseq's conventions: ChoiceEnum choice flags, options grouped by job,
and the original kNN-LM command line's block size answered with a named error."""

import pytest

from tests.conftest import eval_lm


def test_original_dump_command_gets_the_corrected_command(tiny):
    """The original README's `--tokens-per-sample 1536 --context-window 1536` (here 32/32) left
    fairseq with blocks of zero tokens: ZeroDivisionError. Now: a named error with the fix."""
    r = eval_lm(tiny["data"], tiny["ckpt"], "--gen-subset", "valid", "--tokens-per-sample", "32",
                "--context-window", "32", check=False)
    assert r.returncode != 0
    assert "ZeroDivisionError" not in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "ConfigError: --tokens-per-sample 32 leaves no token to score with --context-window 32" in r.stderr
    assert "--tokens-per-sample 64 --context-window 32" in r.stderr


@pytest.mark.parametrize("flag, bad", [("--knn-keytype", "last_ffn_output"), ("--knn-sim-func", "cosine")])
def test_choice_flags_are_refused_by_argparse_with_the_choices(tiny, flag, bad):
    r = eval_lm(tiny["data"], tiny["ckpt"], flag, bad, check=False)
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"argument {flag}: invalid choice: '{bad}'" in r.stderr
    assert "'last_ffn_input'" in r.stderr or "'l2'" in r.stderr  # the choices are listed


def test_options_are_grouped_by_job():
    """fairseq-eval-lm --help exits before any task adds its flags (fairseq parses twice), so the
    groups are checked on the parser the task builds: one argparse group per job."""
    import argparse

    from fairseq_plugins.task import KNNLanguageModelingTask

    parser = argparse.ArgumentParser(prog="fairseq-eval-lm")
    KNNLanguageModelingTask.add_args(parser)
    out = parser.format_help()
    titles = ["kNN-LM: dumping a datastore", "kNN-LM: scoring with a datastore", "kNN-LM: per-token export",
              "continuous cache"]
    positions = [out.find(t + ":") for t in titles]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), out[-3000:]
    dump_group = out[positions[0]:positions[1]]
    assert "--save-knnlm-dstore" in dump_group and "--knn-keytype" in dump_group and "--lmbda" not in dump_group
    assert "{last_ffn_input," in dump_group  # argparse shows the ChoiceEnum's choices
    assert "--tokens-per-sample" in out[:positions[0]]  # fairseq's own language-modeling flags first
