"""Joins the figures of scripts/bench/engine into one Markdown table: the worker's engine
(spool-engine-bench --json) against PyTorch's forward (engine_baseline.py --json), per
variant and batch size, with an earlier build of the engine where one ran (--before), then
fp16 against fp32 where both ran.

Usage: engine_report.py VARIANT ENGINE.json FORWARD.json BEFORE.json|- [VARIANT ...]
       (VARIANT like "fp32 short": the dtype, then the sentence lengths)
"""

import json
import sys
from pathlib import Path

TARGET = 0.90  # the performance issue: engine >= 90% of the raw forward's throughput


def mib(value) -> str:
    return "–" if value is None else f"{value:,.0f}"


def load(path: str):
    return None if path == "-" else json.loads(Path(path).read_text())


def main(argv) -> int:
    if not argv or len(argv) % 4:
        sys.exit(__doc__)
    variants = {}
    for i in range(0, len(argv), 4):
        variants[argv[i]] = (load(argv[i + 1]), load(argv[i + 2]), load(argv[i + 3]))

    first_engine, first_forward, _ = next(iter(variants.values()))
    with_before = any(before for _, _, before in variants.values())
    print(f"Device: {first_engine['device']}; PyTorch {first_forward['torch']}; "
          f"libtorch CPU threads {first_engine['cpu_threads']} (engine) / {first_forward['cpu_threads']} (forward). "
          "Engine: the worker's ModelHandle with two batches in flight, as its consumer runs them: decode JSON + "
          "tokenize (blocking thread), tensors + forward + copy back (model thread), each output as JSON (blocking "
          "thread), then the batch's statement JSON (batch task); throughput is sentences over wall time. "
          "Forward: the TorchScript forward alone, inputs already on the device, one batch at a time.\n")
    before_head = " before sentences/s | before / forward |" if with_before else ""
    print("| variant | batch | tokens mean / padded | engine sentences/s | engine ms/batch (model thread; statement JSON) "
          f"| forward sentences/s | forward ms/batch | engine / forward |{before_head} GPU MiB: engine used | "
          "GPU MiB: forward peak allocated / used |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if with_before else "") + "---:|---:|")
    below = []
    for label, (engine, forward, before) in variants.items():
        before_rows = before["results"] if before else [None] * len(engine["results"])
        for e, f, b in zip(engine["results"], forward["results"], before_rows):
            if (e["batch"], e["padded_tokens"]) != (f["batch"], f["padded_tokens"]):
                sys.exit(f"engine_report: {label}: engine and forward saw different batches "
                         f"({e['batch']}x{e['padded_tokens']} vs {f['batch']}x{f['padded_tokens']})")
            ratio = e["sentences_per_s"] / f["sentences_per_s"]
            if ratio < TARGET:
                below.append(f"{label} batch {e['batch']} ({ratio:.2f})")
            before_cells = ""
            if with_before:
                before_cells = (f" {b['sentences_per_s']:,.0f} | {b['sentences_per_s'] / f['sentences_per_s']:.2f} |"
                                if b else " – | – |")
            print(f"| {label} | {e['batch']} | {e['mean_tokens']:.1f} / {e['padded_tokens']} "
                  f"| {e['sentences_per_s']:,.0f} | {e['ms_per_batch']:.3f} ({e['infer_ms']:.3f}; {e['write_ms']:.3f}) "
                  f"| {f['sentences_per_s']:,.0f} | {f['ms_per_batch']:.3f} | **{ratio:.2f}** |{before_cells}"
                  f" {mib(e['gpu_used_mib'])} | {mib(f['max_allocated_mib'])} / {mib(f['gpu_used_mib'])} |")
    print(f"\nTarget engine >= {TARGET:.0%} of the forward: "
          + ("met at every size." if not below else "missed at " + ", ".join(below) + "."))

    pairs = [(label, label.replace("fp16", "fp32")) for label in variants if "fp16" in label]
    pairs = [(half, full) for half, full in pairs if full in variants]
    if pairs:
        print("\nfp16 against fp32, sentences/s ratio (engine; forward):\n")
        print("| sentences | " + " | ".join(f"batch {r['batch']}" for r in variants[pairs[0][0]][0]["results"]) + " |")
        print("|---|" + "---:|" * len(variants[pairs[0][0]][0]["results"]))
        for half, full in pairs:
            cells = [
                f"{he['sentences_per_s'] / fe['sentences_per_s']:.2f}; {hf['sentences_per_s'] / ff['sentences_per_s']:.2f}"
                for he, hf, fe, ff in zip(variants[half][0]["results"], variants[half][1]["results"],
                                          variants[full][0]["results"], variants[full][1]["results"])
            ]
            print(f"| {half.replace('fp16', '').strip()} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
