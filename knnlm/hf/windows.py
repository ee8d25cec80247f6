"""The sliding windows of Hugging Face's "Perplexity of fixed-length models" guide.

Windows of at most L tokens start every S tokens (S <= L). A window scores the tokens after
the last one an earlier window scored, each given the window's tokens before it. The text's
first token is never scored (nothing precedes it), nor, when S = L, each window's first
token. The windows stop at the first one that reaches the end of the text.

    for w in windows(n_tokens, L, S): w.begin, w.end, w.first   # score targets first..end-1

Dump, eval and check all walk these windows, so a datastore row, an eval token and a check
replay mean the same (window, position).
"""

import dataclasses

import torch

from knnlm.errors import ConfigError
from knnlm.retrieval.adaptive import context_tokens


@dataclasses.dataclass(frozen=True)
class Window:
    begin: int   # first token of the window (absolute position in the text)
    end: int     # one past its last token
    first: int   # first target it scores; it scores first..end-1, each from tokens begin..t-1

    @property
    def scored(self):
        return self.end - self.first


def check_window(max_length, stride, model_positions=None):
    if max_length < 2:
        raise ConfigError(f"--max-length must be at least 2 (a context token and a target), got {max_length}")
    if model_positions is not None and max_length > model_positions:
        raise ConfigError(f"--max-length {max_length} exceeds the model's {model_positions} positions; "
                          f"pass --max-length {model_positions} or less")
    if not 1 <= stride <= max_length:
        raise ConfigError(f"--stride must lie in [1, --max-length {max_length}] (a larger stride would skip "
                          f"tokens), got {stride}")


def windows(n_tokens, max_length, stride):
    """The guide's windows over a text of n_tokens, those that score at least one token."""
    check_window(max_length, stride)
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        first = max(prev_end, begin + 1)
        if end > first:
            out.append(Window(begin, end, first))
        prev_end = end
        if end == n_tokens:
            break
    return out


def shard_windows(wins, num_shards, shard_id):
    """The windows of shard `shard_id` of `num_shards` (`knnlm-hf dump --num-shards N --shard-id i`):
    contiguous runs, as numpy's array_split cuts a list, so the shards' rows in shard order are
    the unsharded dump's rows in order (a shard manifest's global ids = the single dump's rows)."""
    if num_shards < 1:
        raise ConfigError(f"--num-shards must be at least 1, got {num_shards}")
    if not 0 <= shard_id < num_shards:
        raise ConfigError(f"--shard-id must lie in [0, --num-shards {num_shards}), got {shard_id}")
    base, extra = divmod(len(wins), num_shards)
    start = shard_id * base + min(shard_id, extra)
    part = wins[start:start + base + (shard_id < extra)]
    if not part:
        raise ConfigError(f"shard {shard_id} of {num_shards} gets no window: the text has only {len(wins)} "
                          f"window(s); use fewer --num-shards")
    return part


def scored_count(n_tokens, max_length, stride):
    return sum(w.scored for w in windows(n_tokens, max_length, stride))


def batches(wins, batch_size):
    """Consecutive windows of equal length, at most batch_size per batch."""
    group = []
    for w in wins:
        if group and (len(group) == batch_size or w.end - w.begin != group[0].end - group[0].begin):
            yield group
            group = []
        group.append(w)
    if group:
        yield group


@torch.no_grad()
def run_windows(model, ids, wins, capture=None, *, batch_size=1, device="cpu", with_logits=False, lm=True,
                whole_window=False, cache_capture=None):
    """Run `model` over `wins` of the 1-D token tensor `ids`; yield, per window, a dict:
    window, targets (n,), positions (n,) (position t predicts input t + 1), lp_lm (n,) log
    p_LM(target) in fp32, keys (n, D) if `capture`, and lm_log_probs (n, V) if `with_logits`.
    whole_window (the continuous cache): also inputs (L,) and cache_keys (L, D), every
    position's state (from `cache_capture`, else `capture`). With lm=False (a dump: keys and
    targets only) the base model runs without the LM head, whose (T, V) logits would be thrown
    away, and no lp_lm is given; the key hooks sit inside the base model, so they fire the same."""
    run = model if lm else model.base_model
    for group in batches(wins, batch_size):
        inputs = torch.stack([ids[w.begin:w.end] for w in group]).to(device)
        out = run(input_ids=inputs)
        logits = out.logits if lm else None
        keys = capture.pop() if capture is not None else None
        cache_keys = cache_capture.pop() if cache_capture is not None else keys
        for i, w in enumerate(group):
            pos = torch.arange(w.first - w.begin - 1, w.end - w.begin - 1, device=inputs.device)  # predicts pos+1
            targets = inputs[i, pos + 1]
            r = {"window": w, "targets": targets, "positions": pos}
            if lm:
                # the last tokens each prediction read (adaptive retrieval's n-gram features)
                r["context"] = context_tokens(inputs[i], pos)
                lp = logits[i, pos].float().log_softmax(-1)
                r["lp_lm"] = lp.gather(-1, targets[:, None])[:, 0]
                if with_logits:
                    r["lm_log_probs"] = lp
            if keys is not None:
                r["keys"] = keys[i, pos]
            if whole_window:
                r["inputs"], r["cache_keys"] = inputs[i], cache_keys[i]
            yield r
