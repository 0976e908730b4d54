"""Cold tokenisation at scale: records/s, wall time and peak memory of ``load_sources``.

Generates Alpaca-like JSONL sources (instruction 4-17 words, an input on 40% of records, output
5-99 words: about 270 output characters, the mean of Alpaca's answers), trains a byte-level BPE
tokenizer on the same kind of text (``llm.data.tokenizer.bpe_tokenizer``, ChatML template) and
tokenises every source cold, in a fresh process, with ``num_proc`` workers. Then it tokenises one
file of ``--file`` records and one twice as large, each in a fresh process, to show that peak
memory does not grow with the size of a file. Prints JSON lines and a projection to
``--project`` records from the measured CPU time per record (the machine may be shared: the load
average is printed with every measurement).

    python benchmarks/data_scale.py --records 300000 --sources 18 --num-proc 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

N_WORDS = 20_000  # a Zipf vocabulary: frequent words become single BPE tokens, as in English
ZIPF = 1.1


def _vocabulary(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = np.array(["".join(rng.choice(letters, size=int(n)))
                      for n in rng.integers(1, 10, size=N_WORDS)])
    p = 1.0 / np.arange(1, N_WORDS + 1) ** ZIPF
    return words, p / p.sum()


def _sentences(rng: np.random.Generator, words: np.ndarray, p: np.ndarray,
               lengths: np.ndarray) -> list[str]:
    picks = words[rng.choice(N_WORDS, size=int(lengths.sum()), p=p)]
    ends = np.cumsum(lengths)
    return [" ".join(picks[e - n:e]).capitalize() + "." for n, e in zip(lengths, ends)]


def write_alpaca(path: Path, n: int, seed: int) -> None:
    """``n`` Alpaca records, generated and written 10k at a time (kept if already written)."""
    done = path.with_name(path.name + f".{n}-{seed}.done")
    if done.exists() and path.exists():
        return
    words, p = _vocabulary(0)  # one vocabulary for every file and for the tokenizer
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for start in range(0, n, 10_000):
            m = min(10_000, n - start)
            instruction = _sentences(rng, words, p, rng.integers(4, 18, size=m))
            extra = _sentences(rng, words, p, rng.integers(2, 12, size=m))
            has_input = rng.random(m) < 0.4
            output = _sentences(rng, words, p, rng.integers(5, 100, size=m))
            f.writelines(json.dumps({"instruction": a, "input": b if h else "", "output": c}) + "\n"
                         for a, b, h, c in zip(instruction, extra, has_input, output))
    done.touch()


def make_tokenizer(folder: Path, vocab_size: int) -> None:
    from scalebio.llm.data.tokenizer import bpe_tokenizer

    words, p = _vocabulary(0)
    rng = np.random.default_rng(1)
    corpus = _sentences(rng, words, p, rng.integers(5, 100, size=20_000))
    bpe_tokenizer(corpus, vocab_size).save_pretrained(str(folder))


class _TreeSampler(threading.Thread):
    """Samples this process and its descendants (the fork server and its workers are not waited
    children, so getrusage would miss them): peak RSS of the main process, of any worker and of
    the whole tree, and CPU time of every process as last seen (a sample every 0.2 s)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.me, self.stop = psutil.Process(), threading.Event()
        self.cpu: dict[int, float] = {}
        self.peak = {"main": 0, "worker": 0, "total": 0}

    def run(self) -> None:
        while not self.stop.is_set():
            total = 0
            for p in [self.me, *self.me.children(recursive=True)]:
                try:
                    with p.oneshot():
                        rss, t = p.memory_info().rss, p.cpu_times()
                except psutil.Error:
                    continue
                self.cpu[p.pid] = t.user + t.system
                total += rss
                key = "main" if p.pid == self.me.pid else "worker"
                self.peak[key] = max(self.peak[key], rss)
            self.peak["total"] = max(self.peak["total"], total)
            self.stop.wait(0.2)


def _cold_load(args: dict) -> dict:
    """Run in a fresh process: tokenise the given sources cold, report time and memory."""
    import pyarrow.compute as pc

    from scalebio.llm.data.sources import SourceSpec, load_sources
    from scalebio.llm.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args["tokenizer"])
    specs = [SourceSpec(Path(f).stem, f, "alpaca") for f in args["files"]]
    sampler = _TreeSampler()
    sampler.start()
    cpu0 = sampler.me.cpu_times()
    t0 = time.perf_counter()
    data = load_sources(specs, specs[:1], tokenizer, args["max_length"], args["cache"],
                        num_proc=args["num_proc"])
    wall = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    cpu1 = sampler.me.cpu_times()
    cpu_main = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    cpu = cpu_main + sum(t for pid, t in sampler.cpu.items() if pid != sampler.me.pid)
    records = sum(len(d) + data.dropped[n] for d, n in zip(data.train, data.names))
    tokens = sum(pc.sum(pc.list_value_length(d.data.column("input_ids"))).as_py()
                 for d in data.train)
    mb = {k: v // 2**20 for k, v in sampler.peak.items()}
    return {"records": records, "tokens_per_example": round(tokens / records, 1),
            "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "cpu_main_s": round(cpu_main, 1),
            "records_per_s": round(records / wall),
            "cpu_us_per_record": round(cpu / records * 1e6, 1),
            "peak_rss_main_mb": mb["main"], "peak_rss_worker_mb": mb["worker"],
            "peak_rss_total_mb": mb["total"],
            "num_proc": args["num_proc"], "loadavg_1m": round(os.getloadavg()[0], 2)}


def _run_fresh(**kwargs) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(kwargs)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=300_000, help="total over all sources")
    ap.add_argument("--sources", type=int, default=18)
    ap.add_argument("--file", type=int, default=100_000, help="records of the memory check's "
                    "smaller file (the larger has twice as many); 0 skips the check")
    ap.add_argument("--num-proc", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--vocab-size", type=int, default=16_000)
    ap.add_argument("--project", type=int, default=4_200_000, help="records to project to")
    ap.add_argument("--cores", type=int, default=2, help="cores assumed by the projection")
    ap.add_argument("--out", default="/tmp/scalebio_data_scale")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(_cold_load(json.loads(a.child))))
        return
    out = Path(a.out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    make_tokenizer(out / "tokenizer", a.vocab_size)
    files = []
    for k in range(a.sources):
        n = a.records // a.sources + (k < a.records % a.sources)
        files.append(str(out / "data" / f"source{k:02d}.jsonl"))
        write_alpaca(Path(files[-1]), n, seed=100 + k)
    sizes = [a.file, 2 * a.file] if a.file else []
    for n in sizes:
        write_alpaca(out / "data" / f"single{n}.jsonl", n, seed=7)
    mb = sum(os.path.getsize(f) for f in files) / 2**20
    print(json.dumps({"generated_s": round(time.perf_counter() - t0, 1), "files": len(files),
                      "records": a.records, "megabytes": round(mb, 1)}))
    common = {"tokenizer": str(out / "tokenizer"), "max_length": a.max_length,
              "num_proc": a.num_proc}
    run = _run_fresh(files=files, cache=str(out / f"cache-{time.time_ns()}"), **common)
    print(json.dumps({"run": "all sources", **run}))
    projected = a.project * run["cpu_us_per_record"] * 1e-6 / a.cores
    at_rate = a.project / run["records_per_s"]
    print(json.dumps({"project_records": a.project, "cores": a.cores,
                      "projected_wall_s_from_cpu": round(projected),
                      "projected_wall_s_at_measured_rate": round(at_rate)}))
    for n in sizes:
        r = _run_fresh(files=[str(out / "data" / f"single{n}.jsonl")],
                       cache=str(out / f"cache-{time.time_ns()}"), **common)
        print(json.dumps({"run": f"one file of {n} records", **r}))


if __name__ == "__main__":
    main()
