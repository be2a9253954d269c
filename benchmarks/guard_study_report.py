"""Tables from benchmarks/guard_study.py's JSON files (markdown on stdout).

    python benchmarks/guard_study_report.py benchmarks/results/guard_study/*.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from potion.unlearning.guard import GuardConfig, estimate_poison_share, proxy_damage
from potion.unlearning.proxy import ProxyBase
from potion.unlearning.ptn import StepResult


def fmt(v, f="{:.1f}"):
    return "–" if v is None else f.format(v)


def main(paths: list[str]) -> None:
    for path in paths:
        data = json.loads(Path(path).read_text())
        print(f"### {Path(path).stem}\n\n`{data['command']}`\n")
        print("| B | share | \\|Sf\\| | K = \\|Dr\\|/B | paper k* | paper healed | paper damage | proxy at k* "
              "(raw / corrected) | û (true) | guard δ=1 k | guard healed | guard damage | status |")
        print("|" + " --- |" * 13)
        for c in data["cells"]:
            rows = {r["k"]: r for r in c["rows"]}
            base = ProxyBase(**c["proxy0"])
            steps = [StepResult(**{f: r[f] for f in StepResult.__dataclass_fields__}) for r in c["rows"]]
            u = estimate_poison_share(steps, base, c["acc0"], GuardConfig())
            ks = rows.get(c["k_star"])
            raw = corr = None
            if ks is not None:
                st = StepResult(**{f: ks[f] for f in StepResult.__dataclass_fields__})
                raw, corr = proxy_damage(st, base, c["acc0"], 0.0), proxy_damage(st, base, c["acc0"], u)
            pick = c["picks"].get("delta=1,ahead=0", {})
            true_u = c["proxy_poison"] / base.n_target if base.n_target else 0
            print(f"| {c['batch_size']} | {c['share']} | {c['n_forget']} | {c['n_retain'] / c['batch_size']:.0f} | "
                  f"{c['k_star']} | {fmt(ks and ks['healed'])} | {fmt(ks and ks['damage'], '{:+.2f}')} | "
                  f"{fmt(raw, '{:+.2f}')} / {fmt(corr, '{:+.2f}')} | {u:.3f} ({true_u:.3f}) | {pick.get('k')} | "
                  f"{fmt(pick.get('healed'))} | {fmt(pick.get('damage'), '{:+.2f}')} | {pick.get('status')} |")
        print()


if __name__ == "__main__":
    main(sys.argv[1:])
