"""Text helpers of the analyses: token counts, leading slices and seeded samples of lines."""

import math
import random
from pathlib import Path


def n_tokens(lines):
    """Tokens fairseq scores for these lines: the words and one end-of-line each."""
    return sum(len(line.split()) + 1 for line in lines)


def head_lines(lines, fraction):
    """The leading `fraction` of `lines` (at least one)."""
    return lines[:max(1, math.ceil(fraction * len(lines)))] if fraction < 1 else list(lines)


def sample_chunks(lines, *, chunk_lines, seed, fraction=None, tokens=None):
    """A seeded random sample of chunks of `chunk_lines` consecutive lines, in their original
    order: `fraction` of the chunks, or (given `tokens`) random chunks until that many tokens."""
    chunks = [lines[i:i + chunk_lines] for i in range(0, len(lines), chunk_lines)]
    order = list(range(len(chunks)))
    random.Random(seed).shuffle(order)
    if tokens is None:
        if fraction >= 1:
            return list(lines)
        chosen = order[:max(1, round(fraction * len(chunks)))]
    else:
        chosen, total = [], 0
        for i in order:
            if total >= tokens:
                break
            chosen.append(i)
            total += n_tokens(chunks[i])
    return [line for i in sorted(chosen) for line in chunks[i]]


def write_lines(path, lines):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(path)


def read_lines(path):
    return Path(path).read_text(encoding="utf-8").splitlines()
