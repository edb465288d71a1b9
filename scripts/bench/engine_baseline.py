"""PyTorch's own forward of a TorchScript MiniLM artifact: the baseline that
scripts/bench/engine sets beside the worker's engine (spool-engine-bench).

Reads the sentences the engine bench dumped (--dump-inputs: JSON lines {"text": ...};
batch size B uses the first B), tokenizes them with the same tokenizer.json and the same
padding (to the longest in the batch) and truncation (256) as the worker, moves them to the
device, and then times only the forward. Each forward is synchronized on its own, since the
worker also waits for every batch's result; the output stays on the device.

Usage: engine_baseline.py --artifact model.pt --tokenizer tokenizer.json --inputs short.jsonl
       [--device cpu|cuda] [--batches 1,8,32] [--seconds S | --iters N] [--warmup N]
       [--cpu-threads N] [--json FILE]
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer

MAX_TOKENS = 256  # what the worker truncates at (the manifest's max_tokens)


def load_tokenizer(path: Path) -> Tokenizer:
    tokenizer = Tokenizer.from_file(str(path))  # the shipped file pads to a fixed 128: reset it
    tokenizer.enable_padding()
    tokenizer.enable_truncation(MAX_TOKENS)
    return tokenizer


def measure(module, ids, mask, device, warmup: int, iters, seconds: float) -> dict:
    on_cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        for _ in range(max(warmup, 1)):
            module(ids, mask)
        sync()
        total, done = 0.0, 0
        while (done < iters) if iters else (done < 3 or total < seconds):
            started = time.perf_counter()
            module(ids, mask)
            sync()
            total += time.perf_counter() - started
            done += 1
    batch = ids.shape[0]
    result = {
        "batch": batch,
        "iters": done,
        "sentences_per_s": batch * done / total,
        "ms_per_batch": total * 1e3 / done,
        "mean_tokens": mask.sum().item() / batch,
        "padded_tokens": ids.shape[1],
        "max_allocated_mib": None,
        "gpu_used_mib": None,
    }
    if on_cuda:
        free, total_memory = torch.cuda.mem_get_info()
        result["max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        result["gpu_used_mib"] = (total_memory - free) / 2**20
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--inputs", type=Path, required=True, help="JSON lines from spool-engine-bench --dump-inputs")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", default=None, help="comma-separated (default CUDA 1,2,...,256; CPU 1,8,32,64)")
    parser.add_argument("--seconds", type=float, default=None, help="time each size at least this long")
    parser.add_argument("--iters", type=int, default=None, help="time exactly this many forwards per size")
    parser.add_argument("--warmup", type=int, default=None, help="untimed forwards per size first")
    parser.add_argument("--cpu-threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's own); the driver passes the engine's")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    if on_cuda and not torch.cuda.is_available():
        sys.exit("engine_baseline: --device cuda but torch sees no GPU")
    default_batches = "1,2,4,8,16,32,64,128,256" if on_cuda else "1,8,32,64"
    batches = [int(b) for b in (args.batches or default_batches).split(",")]
    seconds = args.seconds if args.seconds is not None else (1.0 if on_cuda else 0.5)
    warmup = args.warmup if args.warmup is not None else (10 if on_cuda else 2)

    texts = [json.loads(line)["text"] for line in args.inputs.read_text().splitlines() if line]
    if len(texts) < max(batches):
        sys.exit(f"engine_baseline: {args.inputs} has {len(texts)} sentences; batch {max(batches)} needs more")
    tokenizer = load_tokenizer(args.tokenizer)
    started = time.perf_counter()
    module = torch.jit.load(str(args.artifact), map_location=device).eval()
    print(f"forward: torch {torch.__version__} on {device} ({torch.get_num_threads()} CPU threads), "
          f"artifact {args.artifact}, "
          f"loaded in {time.perf_counter() - started:.1f} s", flush=True)

    results = []
    for batch in batches:
        encodings = tokenizer.encode_batch(texts[:batch])
        ids = torch.tensor([e.ids for e in encodings], device=device)
        mask = torch.tensor([e.attention_mask for e in encodings], device=device)
        result = measure(module, ids, mask, device, warmup, args.iters, seconds)
        memory = (f", peak allocated {result['max_allocated_mib']:.0f} MiB, GPU used {result['gpu_used_mib']:.0f} MiB"
                  if on_cuda else "")
        print(f"batch {batch:>4}: {result['sentences_per_s']:>9.1f} sentences/s, {result['ms_per_batch']:>8.3f} ms/batch, "
              f"tokens mean {result['mean_tokens']:.1f} padded {result['padded_tokens']}{memory}", flush=True)
        results.append(result)

    if args.json:
        report = {
            "side": "forward",
            "device": device.type,
            "torch": torch.__version__,
            "cpu_threads": torch.get_num_threads(),
            "artifact": str(args.artifact),
            "gpu_memory": "max_allocated_mib: torch.cuda.max_memory_allocated() during the size's runs; "
                          "gpu_used_mib: device memory in use (mem_get_info total - free) after them",
            "results": results,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
