"""Replay the damage guard's choice rule on the suites' recorded guard cells.

Each guarded cell of a suite run before 2026-11-29 afternoon measured the proxy at EVERY
step up to its horizon (the exhaustive scan); its report holds a_k and the proxy damage per
step. This script feeds those recorded numbers to today's ``guard_choose`` (the paper's
scan on Sf, then the proxy only where it asks) and prints, per cell, the old and the new
choice, their a_k, and how many proxy measurements each needed. Steps the old scan never
measured (past its patience stop) count as breaking δ: the old scan stopped there because
10 steps in a row did.

    python benchmarks/guard_replay.py benchmarks/work/mnist-cpu-guard benchmarks/work/cifar10-cpu-guard
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from potion.unlearning.guard import GuardConfig, guard_choose
from potion.unlearning.proxy import ProxyBase
from potion.unlearning.ptn import StepResult

# With no target-labelled part and acc 0, proxy_damage(r) = 100 · acc_proxy: the recorded
# damage of a step is replayed exactly by setting acc_proxy = damage / 100.
REPLAY_BASE = ProxyBase(acc=0.0, acc_target=None, acc_other=None, n=1, n_target=0)
FIELDS = ("k", "s", "alpha", "lam", "n_selected", "acc_forget")


def steps_of(report: dict) -> dict[int, StepResult]:
    return {r["k"]: StepResult(**{f: r[f] for f in FIELDS}) for r in report.get("trace", [])}


def replay(cell: Path) -> dict | None:
    rep = json.loads((cell / "report.json").read_text())
    g = rep["info"]["guard"]
    paper_cell = Path(str(cell).replace("xlf_ptn_guard", "xlf_ptn"))
    paper = json.loads((paper_cell / "report.json").read_text()) if (paper_cell / "report.json").is_file() else {}
    info = rep["info"] if "acc0" in rep["info"] else paper.get("info", {})
    if "acc0" not in info:
        return None
    acc0, thr = info["acc0"], info["threshold"]
    a = {**steps_of(paper), **steps_of(rep)}  # the guard's trace wins where both hold a step
    k_paper = next((k for k in sorted(a) if a[k].acc_forget <= thr), None)
    scan = [a[k] for k in sorted(a) if k_paper is None or k <= k_paper]
    damage = {int(k): v for k, v in g["damage"].items()}

    def measure(k: int) -> StepResult:
        d = damage.get(k, -100.0)  # never measured by the old scan: past its patience stop
        return StepResult(**{**a[k].to_dict(), "acc_proxy": d / 100})

    dec, _ = guard_choose(scan, k_paper, measure, threshold=thr, acc0=acc0, base=REPLAY_BASE,
                          cfg=GuardConfig(max_damage=g.get("max_damage", 1.0)), max_steps=500)
    old, new = g["k_choice"], None if dec.choice is None else dec.choice.k
    return {"cell": cell.name, "k*": k_paper, "old": old, "old_status": g["status"], "new": new,
            "new_status": dec.status, "old_a": None if old is None else a[old].acc_forget,
            "new_a": None if new is None else a[new].acc_forget, "old_proxy_evals": len(damage),
            "new_proxy_evals": len(dec.probes)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("suites", nargs="+", help="suite work folders (holding cells/*xlf_ptn_guard*/report.json)")
    args = ap.parse_args()
    rows = []
    for suite in args.suites:
        for cell in sorted(p.parent for p in Path(suite).glob("cells/*xlf_ptn_guard*/report.json")):
            r = replay(cell)
            if r is None:
                print(f"skipped {cell}: neither it nor its paper cell records acc0")
                continue
            rows.append(r)
            fmt = lambda x: "—" if x is None else f"{x:.3f}"  # noqa: E731
            print(f"{Path(suite).name:20s} {r['cell']:44s} k*={r['k*']}  old k={r['old']} ({r['old_status']}, "
                  f"a={fmt(r['old_a'])})  new k={r['new']} ({r['new_status']}, a={fmt(r['new_a'])})  "
                  f"proxy evals {r['old_proxy_evals']} -> {r['new_proxy_evals']}")
    same_k = sum(r["old"] == r["new"] for r in rows)
    same_a = sum(r["old_a"] == r["new_a"] for r in rows)
    worse = sum(r["new_a"] is not None and r["old_a"] is not None and r["new_a"] > r["old_a"] for r in rows)
    print(f"cells {len(rows)}: same k {same_k}, same a_k {same_a}, higher a_k {worse}; proxy evaluations "
          f"{sum(r['old_proxy_evals'] for r in rows)} -> {sum(r['new_proxy_evals'] for r in rows)}")


if __name__ == "__main__":
    main()
