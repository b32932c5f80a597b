"""The fuzzing campaign at scale: 2000+ seeded corrupt inputs through every reader and command.

    python bench/fuzz.py [--cases 2000] [--seed 100000] [--jobs 2] [--out bench/results/fuzz.md]

Cases come from tests/fuzz.py (see its docstring): a tiny llama GGUF, a GGUF adapter, a PEFT folder, a GGLA
file and a finetune checkpoint made in code, plus the bundled SmolLM2, each truncated, bit-flipped or with one
header field set to a hostile value, fed to `toolkit infer`, `convert lora`, `export-lora` and `finetune
--checkpoint-in`. Every case must exit 0, or 1 with one `toolkit: error:` line naming an input, and leave no
output behind on failure. Writes a table of outcomes per target and tool, and every failure with the mutation that
reproduces it (`fuzz.run_cases(corpus, [fuzz.Case(seed, target, tool, mutation)])`). Exit status 1 if any case
failed (failures owned by another change, fuzz.KNOWN, are listed but do not count).
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import fuzz  # noqa: E402

OUTCOMES = ["exit0", "exit1", "known", "traceback", "crash", "hang", "bad-exit", "bad-message", "leftover",
            "fuzzer-error"]


def table(results: list[fuzz.Result]) -> list[str]:
    summ = fuzz.summary(results)
    cols = [o for o in OUTCOMES if any(c[o] for c in summ.values())]
    names = {"exit0": "exit 0 (harmless)", "exit1": "exit 1, one clean line", "known": "known (other change)"}
    lines = ["| target | tool | cases | " + " | ".join(names.get(c, c) for c in cols) + " |",
             "|---|---|---:|" + "---:|" * len(cols)]
    total: Counter = Counter()
    for (target, tool), c in sorted(summ.items()):
        total.update(c)
        lines.append(f"| {target} | {tool} | {sum(c.values())} | " + " | ".join(str(c[o]) for o in cols) + " |")
    lines.append(f"| **all** | | **{sum(total.values())}** | " + " | ".join(f"**{total[o]}**" for o in cols) + " |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=100_000, help="case i uses seed SEED + i")
    ap.add_argument("--jobs", type=int, default=2, help="cases run at once (forked children)")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds before a case counts as a hang")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "fuzz.md"))
    ap.add_argument("--work", default=None, help="folder for seeds and failing cases (default: a temp folder)")
    args = ap.parse_args()

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="toolkit-fuzz-"))
    t0 = time.perf_counter()
    corpus = fuzz.build_corpus(work)
    cases = fuzz.make_cases(corpus, args.cases, base_seed=args.seed)
    t1 = time.perf_counter()
    results = fuzz.run_cases(corpus, cases, jobs=args.jobs, timeout=args.timeout, progress=True)
    t2 = time.perf_counter()
    bad = fuzz.failures(results)
    known = [r for r in results if r.known]
    load = open("/proc/loadavg").read().split()[0] if Path("/proc/loadavg").exists() else "?"
    lines = [
        "# Fuzzing campaign", "",
        f"`python bench/fuzz.py --cases {args.cases} --seed {args.seed} --jobs {args.jobs}`: {len(cases)} cases in "
        f"{t2 - t1:.0f} s ({(t2 - t1) / max(len(cases), 1) * 1000:.0f} ms a case, {args.jobs} at a time; seeds "
        f"built in {t1 - t0:.0f} s), {platform.machine()}, load average {load} at the end.",
        "", *table(results), "",
        f"Failures: {len(bad)}" + (f"; known (owned by another change): {len(known)}" if known else "") + ".",
    ]
    for r in bad + known:
        lines += ["", f"- {r.outcome}{' (known: ' + r.known + ')' if r.known else ''}: `{r.case.label()}`",
                  "  ```", *("  " + x for x in r.detail.strip().splitlines()[-6:]), "  ```"]
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    print(f"work folder (seeds, failing cases): {work}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
