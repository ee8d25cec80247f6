"""Where a run's time goes: seconds per stage, summed over the run, printed once at its end.

    with timed("search"):                    # around a stage, anywhere in knnlm
        ...
    STAGES.line()  # 'kNN-LM time: search 12.3 s, recompute 8.1 s, ...'

One process-wide stopwatch, like logging's root logger: the stages (LM features, the
predictor, FAISS search, exact recompute, RetoMaton's pointers, scoring) live in different
objects that share nothing else. A perf_counter pair per stage and batch costs microseconds;
on a GPU a stage's time is what the host waited (kernels run asynchronously).
"""

import collections
import contextlib
import time

# The stages in the order a batch passes them (the line prints them in this order).
ORDER = ("features", "predictor", "search", "recompute", "pointers", "scoring")


class Stages:
    def __init__(self):
        self.seconds = collections.defaultdict(float)
        self.calls = collections.Counter()

    @contextlib.contextmanager
    def timed(self, stage):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - t0
            self.calls[stage] += 1

    def add(self, stage, seconds):
        self.seconds[stage] += seconds
        self.calls[stage] += 1

    def reset(self):
        self.seconds.clear()
        self.calls.clear()

    def as_dict(self):
        names = [s for s in ORDER if s in self.seconds] + sorted(set(self.seconds) - set(ORDER))
        return {s: self.seconds[s] for s in names}

    def line(self):
        """'kNN-LM time: features 1.2 s, search 10.0 s, ...' (nothing timed: '')."""
        d = self.as_dict()
        if not d:
            return ""
        return "kNN-LM time: " + ", ".join(f"{name} {sec:.2f} s" for name, sec in d.items())


STAGES = Stages()
timed = STAGES.timed
