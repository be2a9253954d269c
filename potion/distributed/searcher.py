"""The Tune Searcher that decides which PTN steps k the Ray search runs, and when it is done."""
from __future__ import annotations

from typing import Callable

from ray.tune.search import Searcher

from potion.distributed.trials import result_from_metrics
from potion.errors import PotionError
from potion.unlearning.ptn import StepResult, smallest_crossing

# a dead trial's k is proposed again this many times once Tune's own restarts
# (search.TRIAL_RETRIES) are spent: a trial is a pure function of k
REPROPOSALS = 1


# ---------------------------------------------------------------- the searcher
class PTNSearcher(Searcher):
    """Proposes PTN steps k; see :mod:`potion.distributed.search` for the two strategies."""

    def __init__(self, threshold: float, max_steps: int, window: int, strategy: str = "waves",
                 on_result: Callable[[StepResult], None] | None = None, reproposals: int = REPROPOSALS):
        super().__init__(metric="acc_forget", mode="min")
        self.on_result = on_result  # called on the driver as each step's result arrives
        self.reproposals = int(reproposals)
        if strategy == "bracket":
            strategy = "waves"  # in parallel, waves of the window give linear's exact k* at once
        if strategy not in ("linear", "waves", "bisect"):
            raise PotionError(f"unknown PTN strategy '{strategy}'; use linear, waves or bisect")
        if window < 1:
            raise PotionError(f"the PTN window must be at least 1, got {window}")
        self.threshold = float(threshold)
        self.max_steps = int(max_steps)
        self.window = int(window)
        self.bisect = strategy == "bisect"
        self.results: dict[int, StepResult] = {}
        self.pending: dict[str, int] = {}  # trial id → k
        self.proposed: list[int] = []
        self.nodes: dict[int, str] = {}  # k → the Ray node that measured it
        self.failed: str | None = None
        self.retry: list[int] = []  # ks whose trial died: proposed again before anything new
        self.reproposed: dict[int, int] = {}
        self.done = False
        self._next_k = 0  # sliding window: the next k to propose
        self._queue: list[int] = []  # bisect: this round's ks still to hand out
        self._gallop_j = 0

    def __getstate__(self) -> dict:
        # Tune pickles the searcher into its experiment state; the progress callback
        # holds an output stream, which does not pickle and would mean nothing restored.
        return {**self.__dict__, "on_result": None}

    # -- Tune's interface ---------------------------------------------------------
    def suggest(self, trial_id: str):
        if self.done or self.failed:
            return Searcher.FINISHED
        k = self.retry.pop(0) if self.retry else (self._next_bisect() if self.bisect else self._next_window())
        if k == Searcher.FINISHED:
            self.done = True
            return Searcher.FINISHED
        if k is None:
            return None
        self.pending[trial_id] = k
        self.proposed.append(k)
        return {"k": k}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        k = self.pending.pop(trial_id, None)
        if k is None:
            return
        if result and result.get("error"):
            self.failed = f"the trial for k={k} failed: {result['error']}"
            return
        if error or not result or "acc_forget" not in result:
            # The worker died (Tune's own retries are spent): a pure function of k, so run it again.
            if self.reproposed.get(k, 0) < self.reproposals:
                self.reproposed[k] = self.reproposed.get(k, 0) + 1
                self.retry.append(k)
                return
            self.failed = f"the trial for k={k} failed"
            return
        self.results[k] = result_from_metrics(result)
        if result.get("node"):
            self.nodes[k] = str(result["node"])
        if self.on_result is not None:
            self.on_result(self.results[k])

    # -- helpers ------------------------------------------------------------------
    def crossing(self) -> StepResult | None:
        return smallest_crossing(self.results.values(), self.threshold)

    def _next_window(self):
        open_ks = [*self.pending.values(), *self.retry]
        hit = self.crossing()
        if hit is not None:
            # Everything below hit.k was proposed (proposals are consecutive); wait for it.
            return None if any(k < hit.k for k in open_ks) else Searcher.FINISHED
        if self._next_k > self.max_steps:
            return None if open_ks else Searcher.FINISHED
        lowest_open = min(open_ks, default=self._next_k)
        if self._next_k >= lowest_open + self.window:
            return None
        k, self._next_k = self._next_k, self._next_k + 1
        return k

    def _next_bisect(self):
        if self._queue:
            return self._queue.pop(0)
        if self.pending or self.retry:
            return None  # rounds: the next points depend on all of this round's results
        self._queue = self._plan_round()
        return self._queue.pop(0) if self._queue else Searcher.FINISHED

    def _plan_round(self) -> list[int]:
        hit = self.crossing()
        if hit is None:
            if self.max_steps in self.results:
                return []  # galloped to max_steps without a crossing
            ks: list[int] = []
            while len(ks) < self.window:
                k = min(2**self._gallop_j - 1, self.max_steps)
                self._gallop_j += 1
                if k not in self.results and k not in ks:
                    ks.append(k)
                if k == self.max_steps:
                    break
            return ks
        hi = hit.k
        lo = max((k for k, r in self.results.items() if k < hi and r.acc_forget > self.threshold), default=-1)
        inside = hi - lo - 1  # candidates strictly between lo and hi
        if inside <= 0:
            return []
        if inside <= self.window:
            return [k for k in range(lo + 1, hi) if k not in self.results]
        pts = sorted({lo + (i * (hi - lo)) // (self.window + 1) for i in range(1, self.window + 1)})
        return [k for k in pts if lo < k < hi and k not in self.results]
