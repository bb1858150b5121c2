#!/usr/bin/env python
"""Data preparation and input pipeline at scale: throughput, peak memory, start-up time.

    python scripts/bench_data.py [--sizes 1GB,4GB] [--tokenizers byte,bpe] [--json out.json]

For each size, in a temporary directory (removed at the end unless --keep):

1. writes a JSON Lines corpus of that size from ``--source`` (default WikiText-2's
   train.txt in ../shared/data): documents of 1-8 KB of consecutive lines starting at
   seeded random lines, so the corpus is not one text repeated;
2. prepares it with each tokenizer -- byte: ``load_corpus(data.path=corpus.jsonl)``,
   what ``python train.py data.path=corpus.jsonl`` does on its first start; bpe:
   ``scripts/prepare.py --tokenizer bpe`` -- in a child process, reporting wall time,
   MB/s of input and the peak RSS of the whole process tree (main process and workers,
   summed, polled every 0.2 s);
3. the ceiling: the tokenizer's own single-process ``encode_batch`` on 50 MB of the
   same text (all threads), and for the byte tokenizer a plain loop of json.loads +
   UTF-8 encoding;
4. the second start of ``data.path=corpus.jsonl`` (the cache hit) and the opening of the
   BPE directory as ``data.path``: time to the first training batch and peak RSS;
5. Grain input throughput on the prepared data: tokens/s delivered by the training
   dataset iterator alone (no model), against 1 M tokens/s.

Prints a table and writes every figure as JSON (--json).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_corpus(source: str, path: str, size: int, seed: int = 0) -> dict:
    import numpy as np

    with open(source, encoding="utf-8") as f:
        lines = [ln for ln in f.read().split("\n") if ln.strip()]
    rng = np.random.default_rng(seed)
    written = docs = 0
    with open(path, "w", encoding="utf-8") as out:
        while written < size:
            start = int(rng.integers(len(lines)))
            target = int(rng.integers(1024, 8192))
            parts, n, i = [], 0, start
            while n < target:
                parts.append(lines[i % len(lines)])
                n += len(parts[-1]) + 1
                i += 1
            line = json.dumps({"text": "\n".join(parts) + "\n", "id": docs}, ensure_ascii=False) + "\n"
            out.write(line)
            written += len(line.encode("utf-8"))
            docs += 1
    return {"bytes": written, "documents": docs}


class TreeRSS:
    """Peak of the summed RSS of a process and all its descendants, polled every 0.2 s."""

    def __init__(self, pid: int):
        import psutil

        self.proc, self.peak, self._stop = psutil.Process(pid), 0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self):
        import psutil

        while not self._stop.is_set():
            total = 0
            try:
                procs = [self.proc] + self.proc.children(recursive=True)
            except psutil.Error:
                break
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(0.2)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def run_measured(cmd, env=None) -> dict:
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    rss = TreeRSS(p.pid)
    out, err = p.communicate()
    wall = time.perf_counter() - t0
    peak = rss.stop()
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed ({p.returncode}):\n{err[-3000:]}")
    return {"wall_s": wall, "peak_rss_bytes": peak, "stdout": out, "stderr": err}


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]  # mlalm: the installed package


def load_corpus_child(path: str, cache: str, max_memory: str, workers: int, seq_len: int) -> list[str]:
    """``load_corpus`` then the first training batch, printing JSON timings."""
    return _python(f"""
        import json, time
        t0 = time.perf_counter()
        import dataclasses
        from mlalm.config import Config
        from mlalm.data import load_corpus
        cfg = dataclasses.replace(Config().data, path={path!r}, cache_dir={cache!r},
                                  max_memory={max_memory!r}, prepare_workers={workers})
        if __name__ == "__main__":
            c = load_corpus(cfg)
            t1 = time.perf_counter()
            batch = next(iter(c.train_dataset(seq_len={seq_len}, batch_size=16, seed=0)))
            t2 = time.perf_counter()
            print(json.dumps({{"load_corpus_s": t1 - t0, "first_batch_s": t2 - t0,
                               "train_tokens": len(c.train), "val_tokens": len(c.val)}}))
    """)


def ceiling(corpus: str, tokenizer_json: str | None, limit: int = 50 * 10**6) -> dict:
    """Single-process throughput of the work itself on the first ``limit`` bytes."""
    texts, n = [], 0
    t0 = time.perf_counter()
    with open(corpus, "rb") as f:
        for line in f:
            texts.append(json.loads(line)["text"].encode("utf-8"))
            n += len(line)
            if n >= limit:
                break
    parse = time.perf_counter() - t0
    out = {"sample_bytes": n, "json_parse_utf8_MBps": n / parse / 1e6}
    if tokenizer_json:
        from mlalm.data.tokenizers import load_tokenizer

        tok = load_tokenizer(tokenizer_json)
        strs = [t.decode() for t in texts]
        t0 = time.perf_counter()
        tok.tok.encode_batch(strs, add_special_tokens=False)
        out["encode_batch_MBps"] = n / (time.perf_counter() - t0) / 1e6
        t0 = time.perf_counter()
        tok.tok.encode_batch_fast(strs, add_special_tokens=False)
        out["encode_batch_fast_MBps"] = n / (time.perf_counter() - t0) / 1e6
    return out


def grain_throughput(directory: str, seq_len: int, batch: int, seconds: float = 10.0) -> dict:
    from mlalm.data.pipeline import train_dataset
    from mlalm.data.shards import PreparedData

    stream = PreparedData.open(directory, verify="size").split("train").tokens
    it = iter(train_dataset(stream, seq_len=seq_len, batch_size=batch, seed=0))
    next(it)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += next(it).size - batch  # targets per batch: batch * seq_len
    rate = n / (time.perf_counter() - t0)
    return {"seq_len": seq_len, "batch": batch, "tokens_per_s": rate, "vs_1M": rate / 1e6}


def train_start(
    data_path: str | None, work: str, cache: str, name: str, *, compile_cache: bool = False, extra=()
) -> dict:
    """``python train.py`` (configs/default.yaml's model, compilation cache off unless
    ``compile_cache``; it then lives in ``cache``/jax) on ``data_path`` (None: the built-in
    corpus), with the overrides ``extra``: seconds from process start to the first step's
    log line, the peak RSS of the process tree until then, and when each log line before it
    appeared."""
    cmd = [
        sys.executable,
        os.path.join(ROOT, "train.py"),
        "train.steps=2",
        "train.log_every=1",
        "train.progress=false",
        f"train.compile_cache={str(compile_cache).lower()}",
        "checkpoint.every=0",
        f"train.run_dir={os.path.join(work, 'runs')}",
        f"train.name={name}",
        "train.resume=never",
        f"data.cache_dir={cache}",
        *extra,
    ] + ([f"data.path={data_path}"] if data_path else [])
    t0 = time.perf_counter()
    p = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    rss = TreeRSS(p.pid)
    lines, phases = [], []  # phases: (seconds since start, the log line) up to the first step
    for line in p.stdout:
        lines.append(line)
        phases.append((round(time.perf_counter() - t0, 2), line.strip()[:100]))
        if line.startswith("step 1/"):
            break
    first = time.perf_counter() - t0
    peak = rss.stop()
    p.kill()
    p.wait()
    if not lines or not lines[-1].startswith("step 1/"):
        raise RuntimeError("train.py ended before its first step:\n" + "".join(lines[-20:]))
    return {"first_step_s": first, "peak_rss_bytes": peak, "phases": phases}


def bench_size(size: int, args, work: str) -> dict:
    res = {"size_bytes": size}
    corpus = os.path.join(work, "corpus.jsonl")
    t0 = time.perf_counter()
    res["corpus"] = make_corpus(args.source, corpus, size)
    res["corpus"]["write_s"] = time.perf_counter() - t0
    print(
        f"[{size / 1e9:g} GB] corpus: {res['corpus']['documents']:,} documents, "
        f"{res['corpus']['bytes'] / 1e9:.2f} GB in {res['corpus']['write_s']:.0f}s",
        flush=True,
    )
    cache = os.path.join(work, "cache")
    if "byte" in args.tokenizers:
        r = run_measured(load_corpus_child(corpus, cache, args.max_memory, args.workers, args.seq_len))
        r.update(json.loads(r.pop("stdout").strip().splitlines()[-1]))
        r["MBps"] = res["corpus"]["bytes"] / r["wall_s"] / 1e6
        r.pop("stderr")
        res["prepare_byte"] = r
        print(
            f"  prepare byte: {r['wall_s']:.1f}s, {r['MBps']:.1f} MB/s, peak RSS "
            f"{r['peak_rss_bytes'] / 2**30:.2f} GiB",
            flush=True,
        )
        r = run_measured(load_corpus_child(corpus, cache, args.max_memory, args.workers, args.seq_len))
        r.update(json.loads(r.pop("stdout").strip().splitlines()[-1]))
        r.pop("stderr")
        res["second_start_byte"] = r
        print(
            f"  second start (cache hit): first batch after {r['first_batch_s']:.2f}s, peak RSS "
            f"{r['peak_rss_bytes'] / 2**20:.0f} MiB",
            flush=True,
        )
        entry = os.path.join(cache, "prepared", os.listdir(os.path.join(cache, "prepared"))[0])
        res["grain_byte"] = [grain_throughput(entry, t, b) for t, b in ((args.seq_len, 16), (1024, 8))]
    bpe_dir = os.path.join(work, "bpe")
    if "bpe" in args.tokenizers:
        cmd = [
            sys.executable,
            os.path.join(ROOT, "scripts", "prepare.py"),
            corpus,
            "--out",
            bpe_dir,
            "--tokenizer",
            "bpe",
            "--bpe-vocab-size",
            str(args.bpe_vocab_size),
            "--quiet",
            "--max-memory",
            args.max_memory,
            "--workers",
            str(args.workers),
        ]
        r = run_measured(cmd)
        r.pop("stdout"), r.pop("stderr")
        with open(os.path.join(bpe_dir, "manifest.json")) as f:
            m = json.load(f)
        r["MBps"] = res["corpus"]["bytes"] / r["wall_s"] / 1e6
        r["bpe_train_s"] = m["bpe"]["train_seconds"]
        r["bpe_sampled_bytes"] = m["bpe"]["sampled_bytes"]
        r["encode_MBps"] = res["corpus"]["bytes"] / (r["wall_s"] - r["bpe_train_s"]) / 1e6
        r["tokens"] = m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"]
        res["prepare_bpe"] = r
        print(
            f"  prepare bpe: {r['wall_s']:.1f}s ({r['bpe_train_s']:.0f}s BPE training on "
            f"{r['bpe_sampled_bytes'] / 1e6:.0f} MB), {r['MBps']:.1f} MB/s overall, "
            f"{r['encode_MBps']:.1f} MB/s encoding, peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB",
            flush=True,
        )
        r = run_measured(load_corpus_child(bpe_dir, cache, args.max_memory, args.workers, args.seq_len))
        r.update(json.loads(r.pop("stdout").strip().splitlines()[-1]))
        r.pop("stderr")
        res["open_prepared_bpe"] = r
        print(
            f"  open prepared dir: first batch after {r['first_batch_s']:.2f}s, peak RSS "
            f"{r['peak_rss_bytes'] / 2**20:.0f} MiB",
            flush=True,
        )
        res["grain_bpe"] = [grain_throughput(bpe_dir, t, b) for t, b in ((args.seq_len, 16), (1024, 8))]
    res["ceiling"] = ceiling(
        corpus, os.path.join(bpe_dir, "tokenizer.json") if "bpe" in args.tokenizers else None
    )
    if args.train_start:  # train.py to its first step: this corpus vs the built-in one
        builtin_cache = os.path.join(work, "builtin-cache")
        train_start(None, work, builtin_cache, "warm")  # prepares the built-in corpus once
        res["train_start"] = {"builtin": train_start(None, work, builtin_cache, "builtin")}
        if "byte" in args.tokenizers:
            res["train_start"]["raw_byte"] = train_start(corpus, work, cache, "raw")
        if "bpe" in args.tokenizers:
            res["train_start"]["prepared_bpe"] = train_start(bpe_dir, work, cache, "bpe")
        for k, x in res["train_start"].items():
            print(
                f"  train.py to its first step, {k}: {x['first_step_s']:.1f}s, peak RSS "
                f"{x['peak_rss_bytes'] / 2**20:.0f} MiB",
                flush=True,
            )
    return res


def table(results: list[dict]) -> str:
    rows = [("size", "what", "wall", "MB/s", "peak RSS (tree)", "note")]
    for r in results:
        size = f"{r['size_bytes'] / 1e9:g} GB"
        for key, what in (("prepare_byte", "prepare, byte"), ("prepare_bpe", "prepare, bpe")):
            if key in r:
                x = r[key]
                note = (
                    f"BPE trained {x['bpe_train_s']:.0f}s on {x['bpe_sampled_bytes'] / 1e6:.0f} MB; "
                    f"encoding {x['encode_MBps']:.1f} MB/s"
                    if key == "prepare_bpe"
                    else f"{x['train_tokens'] + x['val_tokens']:,} tokens"
                )
                rows.append(
                    (
                        size,
                        what,
                        f"{x['wall_s']:.1f}s",
                        f"{x['MBps']:.1f}",
                        f"{x['peak_rss_bytes'] / 2**30:.2f} GiB",
                        note,
                    )
                )
        for key, what in (
            ("second_start_byte", "2nd start, raw path"),
            ("open_prepared_bpe", "open prepared dir"),
        ):
            if key in r:
                x = r[key]
                rows.append(
                    (
                        size,
                        what,
                        f"{x['first_batch_s']:.2f}s",
                        "",
                        f"{x['peak_rss_bytes'] / 2**20:.0f} MiB",
                        "time to the first training batch",
                    )
                )
        c = r["ceiling"]
        rows.append(
            (
                size,
                "ceiling, 1 process",
                "",
                f"{c['json_parse_utf8_MBps']:.0f}",
                "",
                "json.loads + UTF-8 encode",
            )
        )
        if "encode_batch_MBps" in c:
            rows.append(
                (
                    size,
                    "ceiling, 1 process",
                    "",
                    f"{c['encode_batch_MBps']:.1f}",
                    "",
                    f"tokenizers encode_batch (encode_batch_fast {c['encode_batch_fast_MBps']:.1f})",
                )
            )
        for k, x in r.get("train_start", {}).items():
            rows.append(
                (
                    size,
                    f"train.py, {k}",
                    f"{x['first_step_s']:.1f}s",
                    "",
                    f"{x['peak_rss_bytes'] / 2**20:.0f} MiB",
                    "process start to the first step",
                )
            )
        for key in ("grain_byte", "grain_bpe"):
            for g in r.get(key, []):
                rows.append(
                    (
                        size,
                        f"grain, {key[6:]}",
                        "",
                        "",
                        "",
                        f"T={g['seq_len']} B={g['batch']}: {g['tokens_per_s'] / 1e6:.2f} M tokens/s "
                        f"({g['vs_1M']:.1f}x 1M)",
                    )
                )
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--sizes", default="1GB,4GB")
    p.add_argument("--tokenizers", default="byte,bpe")
    p.add_argument("--source", default=os.path.join(ROOT, "..", "shared", "data", "wikitext-2", "train.txt"))
    p.add_argument(
        "--workdir", default=None, help="where the temporary directory goes (default: system temp)"
    )
    p.add_argument("--max-memory", default="2GB")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--bpe-vocab-size", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument(
        "--train-start",
        action="store_true",
        help="also time python train.py from process start to its first step on this "
        "corpus and on the built-in one (default model, compilation cache off)",
    )
    args = p.parse_args(argv)
    from mlalm.utils import parse_size

    args.tokenizers = args.tokenizers.split(",")
    sizes = [parse_size(s, key="--sizes") for s in args.sizes.split(",")]
    results = []
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "max_memory": args.max_memory,
    }
    try:
        import psutil

        meta["ram_bytes"] = psutil.virtual_memory().total
    except ImportError:
        pass
    for size in sizes:
        work = tempfile.mkdtemp(prefix="mlalm-bench-data-", dir=args.workdir)
        try:
            results.append(bench_size(size, args, work))
        finally:
            if args.keep:
                print(f"kept {work}")
            else:
                shutil.rmtree(work, ignore_errors=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "results": results}, f, indent=1)
    print()
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
