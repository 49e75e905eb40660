"""Does every bad input and fault get a clear answer, and does nothing lose data or hang?

Runs a catalogue of mistakes and faults against golem-run, golem-trace and the library, each
as a separate process with a timeout (and a memory watchdog), on tiny generated checkpoints
and traces in a temporary folder: damaged checkpoints, bad flags and options, bad config.json
fields, bad traces, unwritable output paths, faults mid-run (a shard truncated after load,
Ctrl-C during a stalled read), and concurrent use (profile writers killed mid-way, first-time
demo builds), and golem-server against hostile clients (malformed requests, clients that
leave, a 32-client burst, a busy port, signals and the trace). Valid inputs ride along and
must succeed.

Each case gets a verdict:
  clear error    non-zero exit, a one-line message on stderr, no traceback (due for a mistake)
  ok             a valid input that succeeded (and, where checked, gave the right answer)
  traceback      a Python traceback on stderr
  hang           no answer within the timeout (or the memory watchdog fired; or Ctrl-C took
                 more than 2 s)
  silent accept  exit 0 where an error was due
  data loss      an update lost, a file left unreadable
  misleading     an error whose message blames the wrong thing
  late error     an output-path error found only after generation
  leak           a failed load() left threads or file handles behind
  wrong output   a valid input that ran but whose text differs from mlx-lm's
  refused        a valid input that failed
  unclear        non-zero exit without a message, or a crash by signal

    python benchmarks/check_reliability.py [--quick] [--jobs 2] [--timeout 180] [--only CLASS] [--match REGEX]

Prints the table, then one JSON line with the counts.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np

PASS = {"error": "clear error", "ok": "ok"}
RSS_LIMIT_BYTES = 3 << 30  # a run that grows past this is a runaway, not an answer
SIGINT_LIMIT_S = 2.0
RUN = [sys.executable, "-m", "golem.runtime.cli.run"]
TRACE = [sys.executable, "-m", "golem.runtime.cli.trace"]
GEN = ["-p", "hi", "-m", "3"]


@dataclass
class Outcome:
    rc: Optional[int]
    seconds: float
    stdout: str = ""
    stderr: str = ""
    timed_out: bool = False
    verdict: Optional[str] = None  # set by cases that judge more than the exit (loss, leak, output)
    note: str = ""


@dataclass
class Case:
    """One input or fault.

    Args:
        klass: the class of mistake (the table's first column).
        name: what is tried.
        expect: "error" (a mistake: a clear error is due) or "ok" (valid: must succeed).
        argv: the command, run in the case's own folder; or ``run`` for cases that drive
            processes themselves (signals, concurrency) and judge loss or output.
        quick: part of ``--quick``.
        mention: a regular expression the error message must match (else "misleading").
        avoid: text the message must not contain (else "misleading").
        before_generation: the error must come before any text is generated.
        env: extra environment.
    """

    klass: str
    name: str
    expect: str
    argv: Optional[Callable[["Ctx"], List[str]]] = None
    run: Optional[Callable[["Ctx", "Case", float], Outcome]] = None
    quick: bool = False
    mention: Optional[str] = None
    avoid: Optional[str] = None
    before_generation: bool = False
    env: Optional[Callable[["Ctx"], dict]] = None


@dataclass
class Ctx:
    root: Path
    model: Path
    trace: Path
    tmp_count: List[int] = field(default_factory=lambda: [0])
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fresh(self, name: str) -> Path:
        """A new empty folder for one case."""
        with self.lock:
            self.tmp_count[0] += 1
            path = self.root / "cases" / f"{self.tmp_count[0]:03d}-{re.sub(r'[^a-z0-9]+', '-', name.lower())[:40]}"
        path.mkdir(parents=True)
        return path

    def variant(self, name: str, mutate: Callable[[Path], None]) -> Path:
        """A copy of the model with ``mutate`` applied."""
        path = self.fresh(name) / "model"
        shutil.copytree(self.model, path)
        mutate(path)
        return path


def base_env(ctx: Ctx) -> dict:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "GOLEM_CACHE": str(ctx.root / "cache"), "PYTHONUNBUFFERED": "1"})
    return env


# ----------------------------------------------------------------------------------- running


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_process(argv: List[str], *, env: dict, cwd: Path, timeout_s: float) -> Outcome:
    """Run one command; kill its process group at the timeout or when it outgrows the watchdog."""
    out_path, err_path = cwd / ".stdout", cwd / ".stderr"
    t0 = time.monotonic()
    with open(out_path, "w") as out, open(err_path, "w") as err:
        p = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env, cwd=cwd,
                             start_new_session=True)
        timed_out, note = False, ""
        while p.poll() is None:
            if time.monotonic() - t0 > timeout_s:
                timed_out, note = True, f"no answer in {timeout_s:.0f} s"
            elif _rss_bytes(p.pid) > RSS_LIMIT_BYTES:
                timed_out, note = True, f"grew past {RSS_LIMIT_BYTES >> 30} GB"
            if timed_out:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                break
            time.sleep(0.1)
    seconds = time.monotonic() - t0
    return Outcome(p.returncode, seconds, out_path.read_text(errors="replace"), err_path.read_text(errors="replace"),
                   timed_out, note=note)


def judge(case: Case, out: Outcome) -> str:
    if out.timed_out:
        return "hang"
    if out.verdict:
        return out.verdict
    traceback = "Traceback (most recent call last)" in out.stderr
    if case.expect == "ok":
        if out.rc == 0 and not traceback:
            return "misleading" if case.mention and not re.search(case.mention, out.stderr, re.I) else "ok"
        return "traceback" if traceback else "refused"
    if out.rc == 0:
        return "silent accept"
    if traceback:
        return "traceback"
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    if out.rc is None or out.rc < 0 or not lines or not re.search(r"error|interrupted|failed", lines[-1], re.I):
        return "unclear"
    if case.mention and not re.search(case.mention, out.stderr, re.I):
        return "misleading"
    if case.avoid and case.avoid in out.stderr:
        return "misleading"
    if case.before_generation and "=" * 10 in out.stdout:
        return "late error"
    return "clear error"


def message(out: Outcome) -> str:
    if out.note:
        return out.note
    lines = [l.strip() for l in out.stderr.splitlines() if l.strip()]
    return lines[-1] if lines else ""


# ----------------------------------------------------------------------------------- fixtures


def write_shard_json(path: Path, header: dict) -> None:
    import struct

    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob)


def shards(model: Path) -> List[Path]:
    return sorted(model.glob("model-*.safetensors"))


def edit_config(**changes):
    def mutate(model: Path) -> None:
        config = json.loads((model / "config.json").read_text())
        for key, value in changes.items():
            if value is None:
                config.pop(key, None)
            else:
                config[key] = value
        (model / "config.json").write_text(json.dumps(config))

    return mutate


def trace_arrays(num_steps: int = 40, num_layers: int = 3, num_experts: int = 16, top_k: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    experts = np.stack([[rng.choice(num_experts, top_k, replace=False) for _ in range(num_layers)]
                        for _ in range(num_steps)]).astype(np.int16) if num_steps else np.zeros((0, num_layers, top_k), np.int16)
    weights = rng.random(experts.shape).astype(np.float32)
    meta = {"format": "golem-trace/1", "num_layers": num_layers, "num_experts": num_experts, "top_k": top_k,
            "expert_bytes": 4096, "model": "generated"}
    return {"experts": experts, "weights": weights, "seq_offsets": np.array([0, num_steps], np.int64)}, meta


def write_trace(path: Path, *, meta_override=None, meta_raw=None, **arrays_override) -> Path:
    arrays, meta = trace_arrays(**{k: arrays_override.pop(k) for k in list(arrays_override)
                                   if k in ("num_steps", "num_layers", "num_experts", "top_k")})
    arrays.update(arrays_override)
    if meta_override:
        meta.update(meta_override)
    np.savez(path, **arrays, meta=np.array(meta_raw if meta_raw is not None else json.dumps(meta)))
    return path


# ----------------------------------------------------------------------------------- library scripts

LIBRARY = textwrap.dedent(
    """
    import sys
    MODEL = sys.argv[1]
    try:
    {body}
    except (ValueError, OSError) as e:  # golem's typed errors: ConfigError, ModelError, CheckpointError, ReadError...
        print(f"error: {{type(e).__name__}}: {{e}}", file=sys.stderr)
        sys.exit(2)
    """
)


def library(body: str) -> Callable[[Ctx], List[str]]:
    code = LIBRARY.format(body=textwrap.indent(textwrap.dedent(body).strip(), "    "))
    return lambda ctx: [sys.executable, "-c", code, str(ctx.model)]


LEAK = """
import gc, os, threading
from golem.runtime import load
from golem.runtime.prefetch import PrefetchConfig
OPTIONS = dict(@OPTIONS@)
def counts():
    gc.collect()
    return threading.active_count(), len(os.listdir("/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"))
def attempt():
    try:
        load(MODEL, **OPTIONS).close()
    except (ValueError, OSError) as e:
        return e
    return None
first = attempt()  # imports and one-time pools settle
before = counts()
errors = [attempt() for _ in range(3)]  # kept, as a caller may: what load() did not close stays open
after = counts()
if after[0] > before[0] or after[1] > before[1]:
    print(f"leak: {after[0] - before[0]} threads, {after[1] - before[1]} file handles left open by 3 failed loads", file=sys.stderr)
    sys.exit(3)
if first is None:
    print("accepted")
    sys.exit(0)
raise first
"""

TRUNCATE_MID_RUN = """
import os
import mlx.core as mx
from mlx_lm.generate import generate_step
from golem.runtime import load
with load(MODEL, cache_sizes=4) as (model, tokenizer):
    tokens = mx.array(tokenizer.encode("Once upon a time there was a computer"))
    steps = generate_step(tokens, model, max_tokens=200, sampler=lambda x: mx.argmax(x, axis=-1))
    for i, _ in zip(range(3), steps):
        pass
    for shard in sorted(p for p in os.listdir(MODEL) if p.startswith(PREFIX)):
        path = os.path.join(MODEL, shard)
        if DELETE:
            os.unlink(path)
        else:
            os.truncate(path, os.path.getsize(path) // 3)
    for _ in steps:
        pass
print("generated past a truncated shard")
"""


def leak_case(options: str, mutate: Optional[Callable[[Path], None]] = None):
    """A load() that fails (after its I/O started, where ``mutate`` breaks the model late),
    three times over: no thread or file handle may outlive it."""
    def run(ctx: Ctx, case: Case, timeout_s: float) -> Outcome:
        model = ctx.variant(case.name, mutate) if mutate else ctx.model
        argv = library(LEAK.replace("@OPTIONS@", options))(ctx)
        argv[-1] = str(model)
        out = run_process(argv, env=base_env(ctx), cwd=ctx.fresh(case.name), timeout_s=timeout_s)
        if out.rc == 3:
            out.verdict = "leak"
        return out

    return run


def truncate_mid_run(ctx: Ctx, case: Case, timeout_s: float, delete: bool = False,
                     prefix: str = "model-", mutate: Callable[[Path], None] = lambda m: None) -> Outcome:
    """The files of the model whose names start with ``prefix`` (the shards; or golem-pack's
    data file, on a model ``mutate`` packed) truncated, or deleted, after three tokens."""
    model = ctx.variant(case.name, mutate)
    argv = library(f"DELETE = {delete}\nPREFIX = {prefix!r}\n" + TRUNCATE_MID_RUN)(ctx)
    argv[-1] = str(model)
    return run_process(argv, env=base_env(ctx), cwd=model.parent, timeout_s=timeout_s)


# ----------------------------------------------------------------------------------- process-driving cases

SIGINT_READY_S = 30.0


def sigint_env(ctx: Ctx) -> dict:
    """The environment of a Ctrl-C case. On MLX's CPU backend, ``mx.compile`` builds its
    kernels with the C++ compiler through glibc's ``system()``, which sets SIGINT to SIG_IGN in
    the calling process while the compiler runs: a Ctrl-C landing in that window (the first
    tokens of a run) is dropped by the OS whatever golem does. MLX_DISABLE_COMPILE=1 runs
    the same kernels uncompiled, so no such window opens and the case judges golem alone."""
    return {**base_env(ctx), "MLX_DISABLE_COMPILE": "1"}


def ready_for_sigint(pid: int, deadline_s: float = SIGINT_READY_S) -> bool:
    """Wait until ``pid`` catches SIGINT, neither ignoring nor blocking it (read from
    /proc/<pid>/status); False if it never does by ``deadline_s`` or has ended. Where /proc is
    absent, True at once."""
    status = Path(f"/proc/{pid}/status")
    if not Path("/proc/self/status").exists():
        return True
    mask = 1 << (signal.SIGINT - 1)
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines()
                          if line.startswith(("SigBlk", "SigIgn", "SigCgt")))
        except OSError:  # it has ended
            return False
        if int(fields["SigCgt"], 16) & mask and not (int(fields["SigIgn"], 16) | int(fields["SigBlk"], 16)) & mask:
            return True
        time.sleep(0.005)
    return False


def send_ctrl_c(p: subprocess.Popen, t0: float, reader: threading.Thread,
                failure: Callable[[float, str], Outcome]) -> Tuple[Optional[Outcome], float]:
    """SIGINT to ``p`` once it catches SIGINT, then wait for it to end.

    Returns ``(None, seconds it took to end)``, or ``(failure(seconds, note), 0)`` when it never
    became ready for the signal or was still running 10 s after it (then it is killed)."""
    if not ready_for_sigint(p.pid) and p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        reader.join()
        return failure(time.monotonic() - t0, f"SIGINT ignored or blocked for {SIGINT_READY_S:.0f} s"), 0.0
    sent = time.monotonic()
    os.kill(p.pid, signal.SIGINT)
    try:
        p.wait(10.0)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        reader.join()
        return failure(time.monotonic() - sent, "still running 10 s after Ctrl-C"), 0.0
    reader.join()
    return None, time.monotonic() - sent


def sigint_during_stalled_read(ctx: Ctx, case: Case, timeout_s: float, *extra: str) -> Outcome:
    """Start a run whose reads crawl; once it prints its first line (generation begun), Ctrl-C."""
    cwd = ctx.fresh(case.name)
    argv = RUN + ["--model", str(ctx.model), "-c", "4", "--emulate-storage", "1e-6", *extra, *GEN]
    t0 = time.monotonic()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=sigint_env(ctx),
                         cwd=cwd, start_new_session=True)
    seen = threading.Event()
    out_lines: List[str] = []

    def read_stdout():
        for line in p.stdout:
            out_lines.append(line)
            if line.startswith("=" * 10):
                seen.set()
        seen.set()  # ended without generating

    reader = threading.Thread(target=read_stdout, daemon=True)
    reader.start()
    if not seen.wait(timeout_s):
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        return Outcome(None, time.monotonic() - t0, "".join(out_lines), p.stderr.read(), True,
                       note=f"never started generating in {timeout_s:.0f} s")
    if p.poll() is not None:
        reader.join()
        return Outcome(p.returncode, time.monotonic() - t0, "".join(out_lines), p.stderr.read(),
                       verdict="refused" if p.returncode else "unclear", note="ended before the signal")
    failed, waited = send_ctrl_c(p, t0, reader, lambda seconds, note: Outcome(
        None, seconds, "".join(out_lines), p.stderr.read(), True, note=note))
    if failed is not None:
        return failed
    out = Outcome(p.returncode, waited, "".join(out_lines), p.stderr.read(), note="")
    if waited > SIGINT_LIMIT_S:
        out.timed_out, out.note = True, f"Ctrl-C took {waited:.1f} s"
    return out


def sigint_during_demo_build(ctx: Ctx, case: Case, timeout_s: float) -> Outcome:
    """Ctrl-C while the first --demo builds its checkpoint: a prompt exit, no half folder left,
    and the next --demo builds it."""
    cwd = ctx.fresh(case.name)
    env = sigint_env(ctx)
    env["GOLEM_CACHE"] = str(cwd / "cache")
    t0 = time.monotonic()
    p = subprocess.Popen(RUN + ["--demo", "-m", "3"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         env=env, cwd=cwd, start_new_session=True)
    err_lines: List[str] = []
    seen = threading.Event()

    def read_stderr():
        for line in p.stderr:
            err_lines.append(line)
            if "building the demo" in line:
                seen.set()
        seen.set()

    def building() -> bool:  # off a terminal the stage is named only once done: watch its folder
        cache = cwd / "cache"
        return cache.is_dir() and any(".partial-" in q.name for q in cache.iterdir())

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    deadline = t0 + timeout_s
    while not (seen.is_set() or building()) and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    if not (seen.is_set() or building()) or p.poll() is not None:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        reader.join()
        return Outcome(p.returncode, time.monotonic() - t0, stderr="".join(err_lines), verdict="unclear",
                       note="never started building")
    failed, waited = send_ctrl_c(p, t0, reader, lambda seconds, note: Outcome(
        None, seconds, stderr="".join(err_lines), timed_out=True, note=note))
    if failed is not None:
        return failed
    out = Outcome(p.returncode, waited, stderr="".join(err_lines))
    left = sorted(q.name for q in (cwd / "cache").iterdir() if ".partial" in q.name) if (cwd / "cache").exists() else []
    half = (cwd / "cache" / "demo-qwen3_moe").exists() and not (cwd / "cache" / "demo-qwen3_moe" / "config.json").exists()
    if left or half:
        out.verdict, out.note = "data loss", f"left behind: {left or 'a half-built folder'}"
    elif out.seconds > SIGINT_LIMIT_S:
        out.timed_out, out.note = True, f"Ctrl-C took {out.seconds:.1f} s"
    else:
        again = run_process(RUN + ["--demo", "-m", "3"], env=env, cwd=cwd, timeout_s=timeout_s)
        if again.rc != 0:
            out.verdict, out.note = "refused", f"the next --demo failed: {message(again)}"
    return out


PROFILE_WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from golem.runtime.analysis.profile import record_run
    folder, w, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    counts = np.zeros((2, 8))
    counts[0, w] = 1
    for _ in range(n):
        record_run(folder, counts, top_k=1, num_steps=1, meta={"model": "m"})
        print("ok", flush=True)
    """
)


def profile_writers_killed(ctx: Ctx, case: Case, timeout_s: float) -> Outcome:
    """4 writers x 25 records into one profile, two of them SIGKILLed mid-way (after 5 and 12
    records): the file must parse and count exactly what each writer reported (a killed one may
    have landed one record more than it printed)."""
    from golem.runtime.analysis.profile import PROFILE_FILENAME, ProfileError, load_profile

    folder = ctx.fresh(case.name) / "store"
    killed = {1: 5, 3: 12}
    t0 = time.monotonic()
    procs = {w: subprocess.Popen([sys.executable, "-c", PROFILE_WRITER, str(folder), str(w),
                                  str(100_000 if w in killed else 25)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=base_env(ctx))
             for w in range(4)}
    oks = {w: 0 for w in procs}
    unreadable = 0
    for w, at in killed.items():
        while oks[w] < at:
            line = procs[w].stdout.readline()
            if line != "ok\n":
                break
            oks[w] += 1
            try:
                load_profile(folder / PROFILE_FILENAME)
            except ProfileError:
                unreadable += 1
        procs[w].send_signal(signal.SIGKILL)
    errors = []
    for w, p in procs.items():
        rest = p.stdout.read()
        err = p.stderr.read()
        p.wait(timeout_s)
        oks[w] += rest.count("ok\n")
        if w not in killed and p.returncode != 0:
            errors.append(err.strip().splitlines()[-1] if err.strip() else f"exit {p.returncode}")
    seconds = time.monotonic() - t0
    try:
        profile = load_profile(folder / PROFILE_FILENAME)
    except ProfileError as e:
        return Outcome(0, seconds, verdict="data loss", note=f"file unreadable after the run: {e}")
    landed = profile.counts[0, :4]
    lost = [w for w in procs if not oks[w] <= landed[w] <= oks[w] + (w in killed)]
    note = f"reported {sum(oks.values())}, file counts {int(landed.sum())} runs; {unreadable} unreadable reads"
    if errors:
        return Outcome(1, seconds, stderr="\n".join(errors), verdict="refused", note=errors[0])
    bad = lost or unreadable or profile.runs != int(landed.sum())
    return Outcome(0, seconds, verdict="data loss" if bad else "ok", note=note)


def concurrent_demo_builds(ctx: Ctx, case: Case, timeout_s: float) -> Outcome:
    """Three first-time `golem-run --demo` runs at once, on an empty cache."""
    cwd = ctx.fresh(case.name)
    env = base_env(ctx)
    env["GOLEM_CACHE"] = str(cwd / "cache")
    results = []
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(run_process, RUN + ["--demo", "-m", "3"], env=env, cwd=_sub(cwd, i), timeout_s=timeout_s)
                   for i in range(3)]
        results = [f.result() for f in futures]
    seconds = max(r.seconds for r in results)
    bad = [r for r in results if r.rc != 0 or r.timed_out]
    if not bad:
        return Outcome(0, seconds, note="3 of 3 ran")
    worst = bad[0]
    return Outcome(worst.rc, seconds, worst.stdout, worst.stderr, worst.timed_out,
                   note=f"{len(bad)} of 3 failed: {message(worst)}")


def _sub(folder: Path, i: int) -> Path:
    path = folder / str(i)
    path.mkdir()
    return path


def concurrent_save_profile(ctx: Ctx, case: Case, timeout_s: float) -> Outcome:
    """Three `golem-run --save-profile` at once on one model: the profile counts 3 runs."""
    from golem.runtime.analysis.profile import load_saved_profile, profile_dir_for

    cwd = ctx.fresh(case.name)
    env = base_env(ctx)
    env["GOLEM_CACHE"] = str(cwd / "cache")
    argv = RUN + ["--model", str(ctx.model), "-c", "4", "--save-profile", *GEN]
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda i: run_process(argv, env=env, cwd=_sub(cwd, i), timeout_s=timeout_s), range(3)))
    seconds = max(r.seconds for r in results)
    bad = [r for r in results if r.rc != 0 or r.timed_out]
    if bad:
        return Outcome(bad[0].rc, seconds, bad[0].stdout, bad[0].stderr, bad[0].timed_out,
                       note=f"{len(bad)} of 3 failed: {message(bad[0])}")
    profile = load_saved_profile(profile_dir_for(ctx.model, cwd / "cache"))
    runs = 0 if profile is None else profile.runs
    return Outcome(0, seconds, verdict="ok" if runs == 3 else "data loss", note=f"profile counts {runs} of 3 runs")


def damaged_profile_then_save(ctx: Ctx, case: Case, timeout_s: float) -> Outcome:
    """A garbled saved profile, then `--save-profile`: the run works and a new profile starts."""
    from golem.runtime.analysis.profile import PROFILE_FILENAME, load_saved_profile, profile_dir_for

    cwd = ctx.fresh(case.name)
    env = base_env(ctx)
    env["GOLEM_CACHE"] = str(cwd / "cache")
    folder = profile_dir_for(ctx.model, cwd / "cache")
    folder.mkdir(parents=True)
    (folder / PROFILE_FILENAME).write_text('{"format": "golem-profile/1", "num_la')
    out = run_process(RUN + ["--model", str(ctx.model), "-c", "4", "--save-profile", *GEN], env=env, cwd=cwd,
                      timeout_s=timeout_s)
    if out.rc == 0:
        profile = load_saved_profile(folder)
        if profile is None or profile.runs != 1:
            out.verdict, out.note = "data loss", "no readable profile after the run"
        else:
            out.note = f"set aside: {sorted(p.name for p in folder.glob('*.damaged-*'))}"
    return out


def one_model_two_paths(ctx: Ctx, case: Case, timeout_s: float) -> Outcome:
    """`--save-profile` by a relative path, then by the absolute path: one profile of 2 runs."""
    from golem.runtime.analysis.profile import load_saved_profile, profile_dir_for

    cwd = ctx.fresh(case.name)
    env = base_env(ctx)
    env["GOLEM_CACHE"] = str(cwd / "cache")
    rel = os.path.relpath(ctx.model, cwd)
    total = 0.0
    for path in (rel, str(ctx.model)):
        out = run_process(RUN + ["--model", path, "-c", "4", "--save-profile", *GEN], env=env, cwd=cwd,
                          timeout_s=timeout_s)
        total += out.seconds
        if out.rc != 0 or out.timed_out:
            return out
    profile = load_saved_profile(profile_dir_for(ctx.model, cwd / "cache"))
    runs = 0 if profile is None else profile.runs
    return Outcome(0, total, verdict="ok" if runs == 2 else "data loss", note=f"one profile counts {runs} of 2 runs")


def hub_snapshot_like_mlx_lm(ctx: Ctx, case: Case, timeout_s: float) -> Outcome:
    """The model laid out as the Hugging Face cache keeps it: golem-run's text == mlx_lm's."""
    from golem.runtime.synthetic import as_hub_snapshot

    cwd = ctx.fresh(case.name)
    snap = as_hub_snapshot(ctx.model, cwd / "hub", "org/tiny-moe")
    common = ["--model", str(snap), "--temp", "0", "-m", "8", "-p", "Once upon a time"]
    stock = run_process([sys.executable, "-m", "mlx_lm", "generate", *common], env=base_env(ctx), cwd=cwd,
                        timeout_s=timeout_s)
    out = run_process(RUN + [*common, "-c", "4"], env=base_env(ctx), cwd=cwd, timeout_s=timeout_s)
    if out.rc == 0 and not out.timed_out:
        if stock.rc != 0:
            out.verdict, out.note = "refused", f"mlx_lm itself failed: {message(stock)}"
        elif _text(out.stdout) != _text(stock.stdout):
            out.verdict, out.note = "wrong output", "text differs from mlx_lm generate"
        else:
            out.note = "same text as mlx_lm generate"
    return out


def _text(stdout: str) -> Optional[str]:
    parts = stdout.split("=" * 10)
    return parts[1] if len(parts) >= 3 else None


# ----------------------------------------------------------------------------------- catalogue


def run_argv(*args, model: Optional[Callable[[Ctx], Path]] = None):
    """golem-run on the model (or a variant) with ``args`` (callables get the context)."""
    def build(ctx: Ctx) -> List[str]:
        path = model(ctx) if model else ctx.model
        return RUN + ["--model", str(path), *[a(ctx) if callable(a) else a for a in args]]

    return build


def on_variant(name: str, mutate: Callable[[Path], None]) -> Callable[[Ctx], Path]:
    return lambda ctx: ctx.variant(name, mutate)


def trace_argv(sub: str, *args, trace: Optional[Callable[[Ctx], Path]] = None):
    def build(ctx: Ctx) -> List[str]:
        path = trace(ctx) if trace else ctx.trace
        return TRACE + [sub, *[a(ctx) if callable(a) else a for a in args], str(path)]

    return build


def bad_trace(name: str, **kw) -> Callable[[Ctx], Path]:
    return lambda ctx: write_trace(ctx.fresh(name) / "t.npz", **kw)


def file_with(name: str, filename: str, content: bytes) -> Callable[[Ctx], Path]:
    def make(ctx: Ctx) -> Path:
        path = ctx.fresh(name) / filename
        path.write_bytes(content)
        return path

    return make


def truncated_copy(ctx: Ctx) -> Path:
    path = ctx.fresh("truncated npz") / "t.npz"
    data = ctx.trace.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _pack(model: Path) -> None:
    from golem.runtime import pack

    pack(str(model))


def _stale_pack(model: Path) -> None:
    """Packed, then a shard rewritten (its modification time moves on)."""
    _pack(model)
    shard = shards(model)[-1]
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def _truncated_pack(model: Path) -> None:
    _pack(model)
    data = model / "golem-experts.bin"
    os.truncate(data, data.stat().st_size // 2)


def _truncate_shard(model: Path) -> None:
    shard = shards(model)[-1]
    os.truncate(shard, shard.stat().st_size // 2)


def _corrupt_header(model: Path) -> None:
    shard = shards(model)[0]
    with open(shard, "r+b") as f:
        f.seek(8)
        f.write(b"\xff\xfe garbage \x00" * 4)


def _huge_header_size(model: Path) -> None:
    with open(shards(model)[0], "r+b") as f:
        f.write((1 << 62).to_bytes(8, "little"))


def _escape(model: Path) -> None:
    index = json.loads((model / "model.safetensors.index.json").read_text())
    name = shards(model)[-1].name
    shutil.copyfile(model / name, model.parent / "outside.safetensors")
    index["weight_map"] = {k: ("../outside.safetensors" if v == name else v) for k, v in index["weight_map"].items()}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))


def _index_folder(model: Path) -> None:
    (model / "model.safetensors.index.json").unlink()
    (model / "model.safetensors.index.json").mkdir()


def _shard_loop(model: Path) -> None:
    shard = shards(model)[-1]
    shard.unlink()
    shard.symlink_to(shard.name)


def _absolute_name(model: Path) -> None:
    index = json.loads((model / "model.safetensors.index.json").read_text())
    name = shards(model)[-1].name
    index["weight_map"] = {k: (str(model / v) if v == name else v) for k, v in index["weight_map"].items()}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))


def _wrong_shape(model: Path) -> None:
    """One expert tensor's header claims another shape (same byte count)."""
    import struct

    shard = shards(model)[-1]
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    name = next(k for k in header if k.endswith("switch_mlp.up_proj.weight"))
    shape = header[name]["shape"]
    header[name]["shape"] = [shape[0] * 2, shape[1] // 2, shape[2]]
    blob = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    shard.write_bytes(raw[:8] + blob + raw[8 + n:])


def _hub(ctx: Ctx, name: str, *, drop_index: bool = False, drop_blob: bool = False) -> Path:
    from golem.runtime.synthetic import as_hub_snapshot

    folder = ctx.fresh(name)
    src = ctx.variant(name + " src", lambda m: (m / "model.safetensors.index.json").unlink() if drop_index else None)
    snap = as_hub_snapshot(src, folder / "hub", "org/tiny-moe")
    if drop_blob:
        (snap / os.readlink(snap / shards(src)[-1].name)).unlink()
    return snap


def _linked(ctx: Ctx, name: str = "model") -> Path:
    link = ctx.fresh("linked") / name
    link.symlink_to(ctx.model)
    return link


def _profile(ctx: Ctx, name: str, *, layers: int = 3, nan: bool = False) -> Path:
    from golem.runtime.analysis.profile import profile_from_counts, save_profile

    path = save_profile(profile_from_counts(np.ones((layers, 16)), top_k=4, num_steps=1), ctx.fresh(name) / "p.json")
    if nan:
        path.write_text(path.read_text().replace('"counts":[1,', '"counts":[NaN,', 1))
    return path


def save_then_warm(ctx: Ctx, case: Case, timeout_s: float) -> Outcome:
    cwd = ctx.fresh(case.name)
    env = base_env(ctx)
    env["GOLEM_CACHE"] = str(cwd / "cache")
    first = run_process(RUN + ["--model", str(ctx.model), "-c", "4", "--save-profile", *GEN], env=env, cwd=cwd,
                        timeout_s=timeout_s)
    if first.rc != 0 or first.timed_out:
        return first
    second = run_process(RUN + ["--model", str(ctx.model), "-c", "4", "-W", "saved", *GEN], env=env, cwd=cwd,
                         timeout_s=timeout_s)
    second.seconds += first.seconds
    return second


def _unwritable_cache(ctx: Ctx) -> dict:
    env = base_env(ctx)
    env["GOLEM_CACHE"] = "/proc/golem-cache"
    return env


def _cache_under_file(ctx: Ctx) -> dict:
    env = base_env(ctx)
    f = ctx.fresh("cache under a file") / "file"
    f.write_text("x")
    env["GOLEM_CACHE"] = str(f / "cache")
    return env


def _file(ctx: Ctx, name: str) -> Path:
    path = ctx.fresh(name) / "file"
    path.write_text("x")
    return path


def catalogue() -> List[Case]:
    R = "-f"
    cases = [
        # valid inputs: the baselines that must keep working
        Case("valid", "golem-run -c 4", "ok", run_argv("-c", "4", *GEN), quick=True),
        Case("valid", "golem-run --prefetch-depth 1", "ok", run_argv("-c", "4", "--prefetch-depth", "1", *GEN)),
        Case("valid", "golem-trace stats", "ok", trace_argv("stats"), quick=True),
        Case("valid", "golem-trace simulate -c 6", "ok", trace_argv("simulate", "-c", "6")),
        Case("valid", "hub cache snapshot == mlx_lm", "ok", run=hub_snapshot_like_mlx_lm, quick=True),
        Case("valid", "hub snapshot without an index", "ok",
             lambda ctx: RUN + ["--model", str(_hub(ctx, "no index", drop_index=True)), "-c", "4", *GEN]),
        Case("valid", "model through a symlinked folder", "ok", lambda ctx: RUN + ["--model", str(_linked(ctx)), "-c", "4", *GEN]),
        Case("valid", "model folder named with spaces and accents", "ok",
             lambda ctx: RUN + ["--model", str(_linked(ctx, "mödel dir ✓")), "-c", "4", *GEN]),
        Case("valid", "--save-profile then -W saved", "ok", run=save_then_warm),
        Case("valid", "golem-run --policy lfu-decay:decay=0.5", "ok", run_argv("-c", "4", "--policy", "lfu-decay:decay=0.5", *GEN)),
        Case("valid", "golem-trace simulate --policy lfu-decay:decay=0.5", "ok",
             trace_argv("simulate", "--policy", "lfu-decay:decay=0.5")),
        Case("valid", "golem-run on experts packed by golem-pack", "ok",
             run_argv("-c", "4", *GEN, model=on_variant("packed", _pack)), quick=True),
        # damaged checkpoints
        Case("checkpoint", "truncated shard", "error", run_argv("-c", "4", *GEN, model=on_variant("trunc", _truncate_shard)),
             quick=True, mention="truncated|past the end"),
        Case("checkpoint", "a shard rewritten since golem-pack", "error",
             run_argv("-c", "4", *GEN, model=on_variant("stale", _stale_pack)), quick=True,
             mention="changed since its experts were packed"),
        Case("checkpoint", "golem-pack's data file truncated", "error",
             run_argv("-c", "4", *GEN, model=on_variant("packcut", _truncated_pack)), mention="truncated"),
        Case("checkpoint", "corrupted header", "error", run_argv("-c", "4", *GEN, model=on_variant("hdr", _corrupt_header))),
        Case("checkpoint", "header size 2^62", "error", run_argv("-c", "4", *GEN, model=on_variant("hsz", _huge_header_size))),
        Case("checkpoint", "missing shard", "error",
             run_argv("-c", "4", *GEN, model=on_variant("miss", lambda m: shards(m)[-1].unlink())), mention="missing"),
        Case("checkpoint", "zero-byte shard", "error",
             run_argv("-c", "4", *GEN, model=on_variant("zero", lambda m: os.truncate(shards(m)[0], 0)))),
        Case("checkpoint", "index names ../outside", "error", run_argv("-c", "4", *GEN, model=on_variant("esc", _escape)),
             quick=True, mention="outside the model folder"),
        Case("checkpoint", "index is a folder", "error", run_argv("-c", "4", *GEN, model=on_variant("idx", _index_folder))),
        Case("checkpoint", "shard is a symlink loop", "error", run_argv("-c", "4", *GEN, model=on_variant("loop", _shard_loop))),
        Case("checkpoint", "model is a file", "error", lambda ctx: RUN + ["--model", str(_file(ctx, "model file")), *GEN]),
        Case("checkpoint", "index names /absolute", "error",
             run_argv("-c", "4", *GEN, model=on_variant("abs", _absolute_name)), mention="outside the model folder"),
        Case("checkpoint", "index weight_map not an object", "error",
             run_argv("-c", "4", *GEN, model=on_variant("wm", lambda m: (m / "model.safetensors.index.json").write_text(
                 '{"weight_map": [1, 2]}')))),
        Case("checkpoint", "hub snapshot, a blob gone", "error",
             lambda ctx: RUN + ["--model", str(_hub(ctx, "blob gone", drop_blob=True)), "-c", "4", *GEN], mention="missing"),
        Case("checkpoint", "tokenizer.json garbled", "error",
             run_argv("-c", "4", *GEN, model=on_variant("tok", lambda m: (m / "tokenizer.json").write_text("{garbage"))),
             mention="tokenizer"),
        Case("checkpoint", "tensor of the wrong shape", "error",
             run_argv("-c", "4", *GEN, model=on_variant("shape", _wrong_shape))),
        # config.json
        Case("config", "config.json not JSON", "error",
             run_argv(*GEN, model=on_variant("cfg", lambda m: (m / "config.json").write_text("{oops"))),
             quick=True, mention="config.json"),
        Case("config", "config.json binary", "error",
             run_argv(*GEN, model=on_variant("cfgb", lambda m: (m / "config.json").write_bytes(b"\xff\xfe\x00\x01" * 8))),
             mention="config.json"),
        Case("config", "config.json a list", "error",
             run_argv(*GEN, model=on_variant("cfgl", lambda m: (m / "config.json").write_text("[1, 2]"))), mention="config.json"),
        Case("config", "config.json a folder", "error",
             run_argv(*GEN, model=on_variant("cfgd", lambda m: ((m / "config.json").unlink(), (m / "config.json").mkdir())))),
        Case("config", "no num_experts_per_tok", "error",
             run_argv("-c", "4", *GEN, model=on_variant("ktok", edit_config(num_experts_per_tok=None))),
             quick=True, mention="num_experts_per_tok"),
        Case("config", "no num_experts", "error",
             run_argv("-c", "4", *GEN, model=on_variant("nexp", edit_config(num_experts=None))), mention="num_experts"),
        Case("config", "no hidden_size", "error",
             run_argv("-c", "4", *GEN, model=on_variant("hid", edit_config(hidden_size=None))), mention="hidden_size"),
        Case("config", "no model_type", "error",
             run_argv("-c", "4", *GEN, model=on_variant("mt", edit_config(model_type=None))), mention="model_type"),
        Case("config", "top-k '4' (a string)", "error",
             run_argv("-c", "4", *GEN, model=on_variant("kstr", edit_config(num_experts_per_tok="4"))),
             mention="num_experts_per_tok"),
        Case("config", "top-k 99 > experts", "error",
             run_argv("-c", "4", *GEN, model=on_variant("kbig", edit_config(num_experts_per_tok=99))),
             avoid="--cache-size", mention="num_experts|top-k"),
        Case("config", "top-k 0", "error",
             run_argv("-c", "4", *GEN, model=on_variant("k0", edit_config(num_experts_per_tok=0)))),
        # layer ranges
        Case("ranges", "-f 0-99999999999", "error", run_argv(R, "0-99999999999", *GEN), quick=True),
        Case("ranges", "--cache-size-override 1-99999999999 8", "error",
             run_argv("--cache-size-override", "1-99999999999", "8", *GEN)),
        Case("ranges", "golem-trace simulate -f 0-99999999999", "error", trace_argv("simulate", R, "0-99999999999"), quick=True),
        Case("ranges", "-f ''", "error", run_argv(R, "", *GEN)),
        Case("ranges", "-f 3-1", "error", run_argv(R, "3-1", *GEN)),
        Case("ranges", "-f 0-x", "error", run_argv(R, "0-x", *GEN)),
        Case("ranges", "-f 7 (past the last layer)", "error", run_argv(R, "7", *GEN)),
        Case("ranges", "--cache-size-override '' 8", "error", run_argv("--cache-size-override", "", "8", *GEN)),
        # numbers: NaN, negative, absurd
        Case("numbers", "--emulate-storage nan", "error", run_argv("-c", "4", "--emulate-storage", "nan", *GEN), quick=True),
        Case("numbers", "--emulate-storage -2", "error", run_argv("-c", "4", "--emulate-storage", "-2", *GEN)),
        Case("numbers", "--prefetch-cap-mb=-5", "error",
             run_argv("-c", "4", "--prefetch-depth", "1", "--prefetch-cap-mb=-5", *GEN), quick=True),
        Case("numbers", "--prefetch-cap-mb nan", "error",
             run_argv("-c", "4", "--prefetch-depth", "1", "--prefetch-cap-mb", "nan", *GEN)),
        Case("numbers", "--prefetch-cap-ms -1", "error",
             run_argv("-c", "4", "--prefetch-depth", "1", "--prefetch-cap-ms", "-1", *GEN)),
        Case("numbers", "--threshold nan", "error", run_argv("-c", "4", "--prefetch-depth", "1", "--threshold", "nan", *GEN)),
        Case("numbers", "--threshold without --prefetch-depth", "error", run_argv("-c", "4", "--prefetch-depth", "0", "--threshold", "0.5", *GEN)),
        Case("numbers", "--predictor without --prefetch-depth", "error", run_argv("-c", "4", "--prefetch-depth", "0", "--predictor", "frequency", *GEN)),
        Case("numbers", "--memory-budget 1e400B", "error", run_argv("--memory-budget", "1e400B", *GEN), quick=True),
        Case("numbers", "--memory-budget=-5GB", "error", run_argv("--memory-budget=-5GB", *GEN)),
        Case("numbers", "--memory-budget 1B (holds nothing)", "error", run_argv("--memory-budget", "1B", *GEN)),
        Case("numbers", "--emulate-storage inf", "error", run_argv("-c", "4", "--emulate-storage", "inf", *GEN)),
        Case("numbers", "--emulate-storage 1,abc", "error", run_argv("-c", "4", "--emulate-storage", "1,abc", *GEN)),
        Case("numbers", "--cache-size-override 1-2 -3", "error", run_argv("--cache-size-override", "1-2", "-3", *GEN)),
        Case("numbers", "--cache-size-override 1-2 nan", "error", run_argv("--cache-size-override", "1-2", "nan", *GEN)),
        Case("numbers", "--policy no-such", "error", run_argv("-c", "4", "--policy", "no-such", *GEN)),
        Case("numbers", "--policy lfu-decay:decay=nan", "error", run_argv("-c", "4", "--policy", "lfu-decay:decay=nan", *GEN),
             avoid="unknown policy"),
        Case("numbers", "--policy lfu-decay:decay=-1", "error", run_argv("-c", "4", "--policy", "lfu-decay:decay=-1", *GEN),
             avoid="unknown policy"),
        Case("numbers", "-c 1000 (> experts)", "error", run_argv("-c", "1000", *GEN), mention="experts"),
        Case("numbers", "--cache-size-override 1-2 1000 (> experts)", "error",
             run_argv("-c", "4", "--cache-size-override", "1-2", "1000", *GEN), mention="experts"),
        Case("numbers", "--seed -1", "error", run_argv("-c", "4", "--seed", "-1", *GEN)),
        Case("numbers", "golem-trace simulate -c 0", "error", trace_argv("simulate", "-c", "0")),
        Case("numbers", "golem-trace simulate -c 1000", "error", trace_argv("simulate", "-c", "1000")),
        Case("numbers", "golem-trace simulate --policy lru-k:k=0", "error", trace_argv("simulate", "--policy", "lru-k:k=0")),
        Case("numbers", "golem-trace stats --window 0", "error", trace_argv("stats", "--window", "0")),
        Case("numbers", "golem-trace stats --coverages 1.5", "error", trace_argv("stats", "--coverages", "1.5")),
        Case("numbers", "golem-trace predict --depth -1", "error", trace_argv("predict", "--depth", "-1")),
        Case("numbers", "golem-trace predict --threshold nan", "error", trace_argv("predict", "--threshold=nan")),
        Case("numbers", "golem-trace estimate --ram 1e400GB", "error",
             lambda ctx: TRACE + ["estimate", "--model", "olmoe-1b-7b", "--machine", "m3-max-128g", "--ram", "1e400GB"]),
        Case("numbers", "golem-trace estimate --ssd-gb-per-s nan", "error",
             lambda ctx: TRACE + ["estimate", "--model", "olmoe-1b-7b", "--machine", "m3-max-128g", "--ssd-gb-per-s", "nan"]),
        Case("numbers", "--memory-budget abc", "error", run_argv("--memory-budget", "abc", *GEN)),
        Case("numbers", "--max-tokens 0", "error", run_argv("-c", "4", "-m", "0")),
        Case("numbers", "-c 0", "error", run_argv("-c", "0", *GEN)),
        Case("numbers", "-c 2 < top-k", "error", run_argv("-c", "2", *GEN), mention="top-k"),
        # resource limits
        Case("limits", "--prefetch-depth 20000", "error", run_argv("-c", "4", "--prefetch-depth", "20000", *GEN), quick=True),
        Case("limits", "--prefetch-depth 1000", "error", run_argv("-c", "4", "--prefetch-depth", "1000", *GEN)),
        Case("limits", "--prefetch-depth -1", "error", run_argv("-c", "4", "--prefetch-depth", "-1", *GEN)),
        Case("limits", "--io-parallelism 100000", "error", run_argv("-c", "4", "--io-parallelism", "100000", *GEN), quick=True),
        Case("limits", "--io-parallelism 0", "error", run_argv("-c", "4", "--io-parallelism", "0", *GEN)),
        Case("limits", "--io-parallelism -4", "error", run_argv("-c", "4", "--io-parallelism", "-4", *GEN)),
        # output paths: refused before anything is generated
        Case("output", "--trace-out under a file", "error",
             run_argv("-c", "4", "--trace-out", lambda ctx: str(_file(ctx, "trace under file") / "t.npz"), *GEN),
             quick=True, before_generation=True),
        Case("output", "--trace-out onto a folder", "error",
             run_argv("-c", "4", "--trace-out", lambda ctx: str(ctx.fresh("trace onto folder")), *GEN), before_generation=True),
        Case("output", "--trace-out into a missing folder", "error",
             run_argv("-c", "4", "--trace-out", lambda ctx: str(ctx.fresh("trace missing") / "no" / "t.npz"), *GEN),
             before_generation=True),
        Case("output", "--trace-out into a read-only place", "error",
             run_argv("-c", "4", "--trace-out", "/proc/golem-trace.npz", *GEN), before_generation=True),
        Case("output", "--save-profile, read-only cache", "error", run_argv("-c", "4", "--save-profile", *GEN),
             env=_unwritable_cache, quick=True, before_generation=True),
        Case("output", "--save-profile, cache under a file", "error", run_argv("-c", "4", "--save-profile", *GEN),
             env=_cache_under_file, before_generation=True),
        # traces and warm starts
        Case("trace", "empty .npz", "error", trace_argv("stats", trace=file_with("empty", "t.npz", b"")), quick=True),
        Case("trace", "truncated .npz", "error", trace_argv("stats", trace=truncated_copy)),
        Case("trace", "text file as a trace", "error",
             trace_argv("stats", trace=file_with("text", "t.txt", b"hello\n")), avoid="allow_pickle", quick=True),
        Case("trace", "meta not an object", "error", trace_argv("stats", trace=bad_trace("meta", meta_raw="[1, 2]")),
             mention="meta"),
        Case("trace", "meta num_experts 10^9", "error",
             trace_argv("simulate", trace=bad_trace("huge", meta_override={"num_experts": 10**9}))),
        Case("trace", "int64 expert id 65541", "error",
             trace_argv("simulate", trace=bad_trace("ids", experts=np.full((40, 3, 4), 65541, np.int64))), quick=True),
        Case("trace", "zero steps", "error", trace_argv("simulate", trace=bad_trace("zero", num_steps=0)), quick=True),
        Case("trace", "NaN weights", "error",
             trace_argv("stats", trace=bad_trace("nan", weights=np.full((40, 3, 4), np.nan, np.float32)))),
        Case("trace", "negative expert_bytes", "error",
             trace_argv("simulate", trace=bad_trace("eb", meta_override={"expert_bytes": -5}))),
        Case("trace", "golem-run -W text file", "error",
             run_argv("-c", "4", "-W", lambda ctx: str(file_with("warm", "w.txt", b"hello\n")(ctx)), *GEN),
             avoid="allow_pickle"),
        Case("trace", "golem-run --predictor-trace empty", "error",
             run_argv("-c", "4", "--prefetch-depth", "1", "--predictor", "oracle", "--predictor-trace",
                      lambda ctx: str(file_with("pt", "t.npz", b"")(ctx)), *GEN)),
        Case("trace", "-W saved, none yet: starts cold, says so", "ok", run_argv("-c", "4", "-W", "saved", *GEN),
             mention="no profile saved for this model yet"),
        Case("trace", "-W a profile of another shape", "error",
             run_argv("-c", "4", "-W", lambda ctx: str(_profile(ctx, "shape", layers=7)), *GEN), mention="layers"),
        Case("trace", "-W a profile with a NaN count", "error",
             run_argv("-c", "4", "-W", lambda ctx: str(_profile(ctx, "nan", nan=True)), *GEN)),
        Case("trace", "-W a folder with nothing", "error", run_argv("-c", "4", "-W", lambda ctx: str(ctx.fresh("empty warm")), *GEN)),
        Case("trace", "golem-run -W trace of another model", "error",
             run_argv("-c", "4", "-W", lambda ctx: str(bad_trace("other", num_layers=5, num_experts=8)(ctx)), *GEN)),
        Case("trace", "--predictor-train text file", "error",
             run_argv("-c", "4", "--prefetch-depth", "1", "--predictor", "frequency", "--predictor-train",
                      lambda ctx: str(file_with("ptrain", "t.npz", b"hello")(ctx)), *GEN)),
        Case("trace", "golem-trace a folder without traces", "error", trace_argv("stats", trace=lambda ctx: ctx.fresh("no traces"))),
        Case("trace", "golem-trace predict on a text file", "error",
             trace_argv("predict", trace=file_with("ptxt", "t.npz", b"hello")), avoid="allow_pickle"),
        Case("trace", "golem-trace plot --out under a file", "error",
             trace_argv("plot", "--out", lambda ctx: str(_file(ctx, "plot out") / "x"))),
        # the library: typed errors, nothing left running
        Case("library", "cache_sizes={999: 8}", "error",
             library("from golem.runtime import load\nload(MODEL, cache_sizes={999: 8}).close()"), quick=True),
        Case("library", "cache_sizes={'1': 2}", "error", library("from golem.runtime import load\nload(MODEL, cache_sizes={'1': 2}).close()")),
        Case("library", "cache_sizes={0: 8} (a dense layer)", "error",
             library("from golem.runtime import load\nload(MODEL, cache_sizes={0: 8}).close()")),
        Case("library", "cache_sizes=0", "error", library("from golem.runtime import load\nload(MODEL, cache_sizes=0).close()")),
        Case("library", "missing model folder", "error",
             library("from golem.runtime import load\nload(MODEL + '-missing', cache_sizes=4).close()")),
        Case("library", "failed load (unknown predictor) leaves nothing", "error",
             run=leak_case("cache_sizes=4, prefetch=PrefetchConfig(depth=1), predictor='no-such-predictor'"), quick=True),
        Case("library", "failed load (bad tokenizer.json) leaves nothing", "error",
             run=leak_case("cache_sizes=4, prefetch=PrefetchConfig(depth=1)",
                           lambda m: (m / "tokenizer.json").write_text("{garbage")), mention="tokenizer"),
        Case("library", "failed load (bad -W trace) leaves nothing", "error",
             run=leak_case("cache_sizes=4, prefetch=PrefetchConfig(depth=1), warm_start=MODEL + '/config.json'")),
        Case("library", "prefetch depth 20000", "error", library(
            "from golem.runtime import load\nfrom golem.runtime.prefetch import PrefetchConfig\n"
            "load(MODEL, cache_sizes=4, prefetch=PrefetchConfig(depth=20000)).close()")),
        Case("library", "io_parallelism=10**5", "error",
             library("from golem.runtime import load\nload(MODEL, cache_sizes=4, io_parallelism=10**5).close()")),
        Case("library", "pin_layers='0-99999999999'", "error",
             library("from golem.runtime import load\nload(MODEL, pin_layers='0-99999999999').close()")),
        Case("library", "memory_budget='1e400B'", "error",
             library("from golem.runtime import load\nload(MODEL, memory_budget='1e400B').close()")),
        Case("library", "emulate_storage='nan'", "error",
             library("from golem.runtime import load\nload(MODEL, cache_sizes=4, emulate_storage='nan').close()")),
        Case("library", "unknown option", "error",
             library("from golem.runtime import load\nload(MODEL, capacity=4).close()")),
        Case("library", "trace_out under a file", "error", lambda ctx: library(
            f"from golem.runtime import load\nload(MODEL, cache_sizes=4, trace_out={str(_file(ctx, 'lib trace') / 't.npz')!r}).close()")(ctx)),
        # faults while running
        Case("fault", "shard truncated after load", "error", run=truncate_mid_run, quick=True, mention="read|truncat|short"),
        Case("fault", "golem-pack's data file truncated after load", "error", mention="read|truncat|short",
             run=lambda ctx, case, t: truncate_mid_run(ctx, case, t, prefix="golem-experts.bin", mutate=_pack)),
        Case("fault", "Ctrl-C during a stalled read", "error", run=sigint_during_stalled_read, quick=True,
             mention="interrupted"),
        Case("fault", "Ctrl-C during stalled prefetch", "error", run=lambda ctx, case, t: sigint_during_stalled_read(
            ctx, case, t, "--prefetch-depth", "1"), mention="interrupted"),
        Case("fault", "Ctrl-C during a stalled --direct-io read", "error", run=lambda ctx, case, t: sigint_during_stalled_read(
            ctx, case, t, "--direct-io"), mention="interrupted"),
        Case("fault", "Ctrl-C while --demo builds its checkpoint", "error", run=sigint_during_demo_build,
             mention="interrupted"),
        Case("fault", "shard deleted after load (open files read on)", "ok",
             run=lambda ctx, case, t: truncate_mid_run(ctx, case, t, delete=True)),
        # concurrent use and the profile store
        Case("concurrency", "profile: 4 writers x 25, 2 SIGKILLed", "ok", run=profile_writers_killed, quick=True),
        Case("concurrency", "3 first --demo runs at once", "ok", run=concurrent_demo_builds, quick=True),
        Case("concurrency", "3 --save-profile runs at once", "ok", run=concurrent_save_profile),
        Case("profile", "damaged profile, then --save-profile", "ok", run=damaged_profile_then_save, quick=True),
        Case("profile", "one model by relative and absolute path", "ok", run=one_model_two_paths),
    ]
    cases += integrity_cases()
    return cases


# ----------------------------------------------------------------------------------- server
# golem-server against hostile and careless clients. Self-contained: each case starts its own
# server (port 0: the OS picks one, read back from the log) and judges it over real HTTP.

SERVER = [sys.executable, "-m", "golem.runtime.cli.server"]
SERVER_PORT = re.compile(r"Starting httpd at \S+ on port (\d+)")


class _Served:
    """One golem-server process of a case: its port (from its log), requests, its /proc figures."""

    def __init__(self, ctx: Ctx, case: Case, timeout_s: float, *extra: str, env: Optional[dict] = None):
        self.cwd = ctx.fresh(case.name)
        self.log = self.cwd / "server.log"
        self.timeout_s = timeout_s
        self.t0 = time.monotonic()
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                SERVER + ["--model", str(ctx.model), "-c", "6", "--port", "0", "--max-tokens", "6", *extra],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.cwd,
                env=env or base_env(ctx), start_new_session=True)
        self.port = None
        while self.port is None:
            found = SERVER_PORT.search(self.text())
            if found:
                self.port = int(found.group(1))
            elif self.proc.poll() is not None or time.monotonic() - self.t0 > timeout_s:
                raise RuntimeError(f"golem-server did not start: {self.text()[-300:]}")
            else:
                time.sleep(0.05)
        while self.request("GET", "/health", retry=True)[0] != 200:
            time.sleep(0.05)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def request(self, method: str, path: str, body=None, raw: Optional[bytes] = None, headers=None,
                retry: bool = False) -> Tuple[int, object]:
        import http.client

        while True:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout_s)
            try:
                data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
                conn.request(method, path, body=data, headers=headers or {"Content-Type": "application/json"})
                r = conn.getresponse()
                text = r.read().decode(errors="replace")
                try:
                    return r.status, json.loads(text)
                except ValueError:
                    return r.status, text
            except (ConnectionError, OSError) as e:
                if not retry or time.monotonic() - self.t0 > self.timeout_s:
                    return 0, f"{type(e).__name__}: {e}"
                time.sleep(0.05)
            finally:
                conn.close()

    def completion(self, prompt: str, **extra) -> Tuple[int, object]:
        status, answer = self.request("POST", "/v1/completions", {
            "prompt": prompt, "max_tokens": 6, "temperature": 0.0, "logprobs": True, **extra})
        if status != 200:
            return status, answer
        return status, [e["id"] for e in answer["choices"][0]["logprobs"]["content"]]

    def metrics(self) -> dict:
        status, text = self.request("GET", "/metrics")
        if status != 200:
            return {}
        return {k: float(v) for k, _, v in (l.rpartition(" ") for l in text.splitlines() if l and l[0] != "#")}

    def proc_figures(self) -> Tuple[int, int, int]:
        """(threads, open files, resident bytes) of the server process."""
        threads = len(os.listdir(f"/proc/{self.proc.pid}/task"))
        fds = len(os.listdir(f"/proc/{self.proc.pid}/fd"))
        return threads, fds, _rss_bytes(self.proc.pid)

    def settled_figures(self, settle_s: float = 0.5) -> Tuple[int, int, int]:
        """``proc_figures`` once the threads and files of requests just answered are gone: the
        fewest threads and open files seen over ``settle_s``, and the resident bytes then."""
        best = self.proc_figures()
        end = time.monotonic() + settle_s
        while time.monotonic() < end:
            time.sleep(0.05)
            now = self.proc_figures()
            best = (min(best[0], now[0]), min(best[1], now[1]), now[2])
        return best

    def signal(self, signum: int) -> Optional[int]:
        self.proc.send_signal(signum)
        try:
            return self.proc.wait(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def outcome(self, rc: Optional[int], verdict: str, note: str) -> Outcome:
        text = self.text()
        if verdict in ("ok", "clear error") and "Traceback (most recent call last)" in text:
            verdict, note = "traceback", "a traceback in the server's log"
        return Outcome(rc, time.monotonic() - self.t0, stderr=text[-2000:], verdict=verdict, note=note)


# Malformed requests, each due a 400 naming what is wrong (none of them the unit tests' own).
SERVER_BAD = [
    ({"stop": {"a": 1}}, "stop"), ({"stop": [""]}, "stop"), ({"seed": [1]}, "seed"), ({"seed": True}, "seed"),
    ({"logit_bias": {"1.5": 2}}, "logit_bias"), ({"logit_bias": {"3": None}}, "logit_bias"),
    ({"logit_bias": {str(i): 1 for i in range(5000)}}, "logit_bias"), ({"top_logprobs": 50}, "top_logprobs"),
    ({"max_tokens": -5}, "max_tokens"), ({"max_completion_tokens": 2.5}, "max_completion_tokens"),
    ({"stream": True, "stream_options": {"include_usage": "yes"}}, "include_usage"),
    ({"presence_penalty": "high"}, "presence_penalty"), ({"repetition_context_size": -1}, "repetition_context_size"),
    ({"top_k": 1.5}, "top_k"), ({"min_p": -0.1}, "min_p"), ({"xtc_probability": 7}, "xtc_probability"),
    ({"prompt": None}, "prompt"), ({"prompt": {"text": "hi"}}, "prompt"), ({"num_draft_tokens": -2}, "num_draft_tokens"),
]
# Requests for what this server does not serve: a 404 naming it, nothing unloaded.
SERVER_NOT_SERVED = [{"model": "some/other"}, {"draft_model": "some/other"}, {"adapters": "/tmp/other-adapter"}]
SERVER_BAD_RAW = [
    (b"\x1f\x8b\x08\x00binary gzip-ish", "UTF-8"), (b'"just a string"', "object"), (b"", "JSON"),
    (b'{"prompt": "hi", "temperature": -Infinity}', "temperature"), (b"[" * 50_000 + b"]" * 50_000, "nested"),
]


def server_malformed(ctx: Ctx, case: Case, timeout_s: float) -> Outcome:
    served = _Served(ctx, case, timeout_s)
    try:
        _, want = served.completion("Once upon a time")
        wrong = []
        for fields, word in SERVER_BAD:
            status, answer = served.request("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 3, **fields})
            if status != 400 or word not in str(answer):
                wrong.append(f"{sorted(fields)[0]}: {status} {str(answer)[:60]}")
        for fields in SERVER_NOT_SERVED:
            status, answer = served.request("POST", "/v1/completions", {"prompt": "hi", **fields})
            if status != 404 or "golem-server" not in str(answer):
                wrong.append(f"{sorted(fields)[0]}: {status} {str(answer)[:60]}")
        for raw, word in SERVER_BAD_RAW:
            status, answer = served.request("POST", "/v1/completions", raw=raw)
            if status != 400 or word not in str(answer):
                wrong.append(f"{raw[:12]!r}: {status} {str(answer)[:60]}")
        status, models = served.request("GET", "/v1/models")
        if status != 200 or not models.get("data"):
            wrong.append(f"/v1/models: {status} {str(models)[:60]}")
        status, again = served.completion("Once upon a time")
        if wrong:
            return served.outcome(1, "silent accept", f"{len(wrong)} not a 400 with a message: {wrong[0]}")
        if status != 200 or again != want:
            return served.outcome(1, "wrong output", f"after the bad requests: {status} {str(again)[:80]}")
        return served.outcome(0, "ok", f"{len(SERVER_BAD) + len(SERVER_BAD_RAW)} bad requests: 400s, "
                                       f"{len(SERVER_NOT_SERVED)} for other models: 404s; the same tokens after")
    finally:
        served.close()


def server_disconnects(ctx: Ctx, case: Case, timeout_s: float) -> Outcome:
    """Two clients (one streaming) ask for 100,000 tokens and leave; their generations must stop."""
    import socket as socket_

    served = _Served(ctx, case, timeout_s)
    try:
        for stream in (False, True):
            body = json.dumps({"prompt": "Once upon a time", "max_tokens": 100_000, "stream": stream}).encode()
            before = served.metrics().get("golem_decode_steps_total", 0)
            s = socket_.create_connection(("127.0.0.1", served.port), timeout=timeout_s)
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(body) + body)
            deadline = time.monotonic() + timeout_s
            while served.metrics().get("golem_decode_steps_total", 0) < before + 5:
                if time.monotonic() > deadline:
                    return served.outcome(None, "hang", "the request never started generating")
                time.sleep(0.05)
            s.close()
        # The generations stop: the step counter settles well short of 100,000.
        last, settled_at = -1.0, time.monotonic()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() - settled_at < 2.0:
            steps = served.metrics().get("golem_decode_steps_total", 0)
            if steps != last:
                last, settled_at = steps, time.monotonic()
            if time.monotonic() > deadline:
                return served.outcome(None, "hang", f"generation still running after the clients left ({steps:.0f} steps)")
            time.sleep(0.1)
        m = served.metrics()
        gone = m.get("golem_client_disconnects_total", 0)
        status, _ = served.completion("Once upon a time")
        if gone != 2 or status != 200:
            return served.outcome(1, "refused", f"disconnects counted {gone:.0f} of 2; next request {status}")
        return served.outcome(0, "ok", f"both stopped ({last:.0f} decode steps in all); the next request served")
    finally:
        served.close()


def server_burst(ctx: Ctx, case: Case, timeout_s: float) -> Outcome:
    """32 clients at once: all answered, the tokens of a sequential run, no thread or file left."""
    served = _Served(ctx, case, timeout_s)
    try:
        prompts = [f"Burst client {i}: the disk {i % 3} reads expert {i}" for i in range(32)]
        sequential = [served.completion(p) for p in prompts]
        if any(status != 200 for status, _ in sequential):
            return served.outcome(1, "refused", f"sequential run failed: {sequential[0]}")
        baseline = served.settled_figures()  # not a snapshot racing the last request's thread
        barrier = threading.Barrier(len(prompts))

        def ask(p):
            barrier.wait(timeout=timeout_s)
            return served.completion(p)

        with ThreadPoolExecutor(len(prompts)) as pool:
            burst = list(pool.map(ask, prompts))
        failed = [a for a in burst if a[0] != 200]
        if failed:
            return served.outcome(1, "refused", f"{len(failed)} of 32 failed: {str(failed[0])[:80]}")
        if burst != sequential:
            differ = sum(a != b for a, b in zip(burst, sequential))
            return served.outcome(1, "wrong output", f"{differ} of 32 answers differ from the sequential run")
        deadline = time.monotonic() + timeout_s
        grown = lambda f: f[0] > baseline[0] or f[1] > baseline[1]  # noqa: E731  (threads or files left)
        while grown(served.proc_figures()) and time.monotonic() < deadline:
            time.sleep(0.1)
        after = served.proc_figures()
        note = (f"32 of 32, tokens as sequential; threads {baseline[0]}->{after[0]}, files {baseline[1]}->{after[1]}, "
                f"RSS {baseline[2] / 1e6:.0f}->{after[2] / 1e6:.0f} MB")
        if grown(after) or after[2] > baseline[2] * 1.25 + 64e6:
            return served.outcome(0, "leak", note)
        return served.outcome(0, "ok", note)
    finally:
        served.close()


def server_busy_port(ctx: Ctx, case: Case, timeout_s: float) -> Outcome:
    import socket as socket_

    with socket_.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = run_process(SERVER + ["--model", str(ctx.model), "--port", str(port)], env=base_env(ctx),
                          cwd=ctx.fresh(case.name), timeout_s=timeout_s)
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    if out.rc == 2 and len(lines) > 1:
        out.verdict, out.note = "unclear", f"{len(lines)} lines on stderr"
    elif out.rc == 2:
        out.note = f"{message(out)} ({out.seconds:.1f} s)"
    return out


def server_trace_kept(ctx: Ctx, case: Case, timeout_s: float, signum: int = signal.SIGHUP) -> Outcome:
    """A request that ran, one naming an unknown model, one malformed: the trace written at
    SIGHUP (or SIGTERM) holds the first request's steps."""
    from golem.runtime.trace import load_trace

    trace = ctx.fresh(case.name + "-out") / "served.npz"
    served = _Served(ctx, case, timeout_s, "--trace-out", str(trace))
    try:
        status, tokens = served.completion("Once upon a time")
        other, _ = served.request("POST", "/v1/completions", {"prompt": "hi", "model": "no/such-model"})
        bad, _ = served.request("POST", "/v1/completions", {"prompt": "hi", "seed": "x"})
        rc = served.signal(signum)
        if rc is None:
            return served.outcome(None, "hang", f"no exit in {timeout_s:.0f} s after the signal")
        if status != 200 or other != 404 or bad != 400:
            return served.outcome(rc, "refused", f"answers {status}, {other}, {bad} (due 200, 404, 400)")
        if not trace.exists():
            return served.outcome(rc, "data loss", "no trace written")
        steps = load_trace(trace).num_steps
        if steps < len(tokens):
            return served.outcome(rc, "data loss", f"trace of {steps} steps for a request of {len(tokens)} tokens")
        return served.outcome(rc, "ok" if rc == 0 else "unclear", f"exit {rc}; trace of {steps} steps kept")
    finally:
        served.close()


def server_stopped_before_any_request(ctx: Ctx, case: Case, timeout_s: float) -> Outcome:
    """SIGTERM before the first request: exit 0, and a file already at --trace-out untouched."""
    trace = ctx.fresh(case.name + "-out") / "kept.npz"
    trace.write_bytes(b"an earlier run's trace")
    served = _Served(ctx, case, timeout_s, "--trace-out", str(trace))
    try:
        rc = served.signal(signal.SIGTERM)
        if rc is None:
            return served.outcome(None, "hang", f"no exit in {timeout_s:.0f} s after SIGTERM")
        if trace.read_bytes() != b"an earlier run's trace":
            return served.outcome(rc, "data loss", "the file at --trace-out was replaced though nothing ran")
        return served.outcome(rc, "ok" if rc == 0 else "unclear", f"exit {rc}; the earlier file kept")
    finally:
        served.close()


def server_cases() -> List[Case]:
    return [
        Case("server", f"{len(SERVER_BAD) + len(SERVER_BAD_RAW) + len(SERVER_NOT_SERVED)} malformed or foreign "
             "requests, then a valid one", "ok", run=server_malformed, quick=True),
        Case("server", "clients leave mid-generation (stream and not)", "ok", run=server_disconnects, quick=True),
        Case("server", "a burst of 32 concurrent clients", "ok", run=server_burst, quick=True),
        Case("server", "second server on a busy port", "error", run=server_busy_port, mention="in use", quick=True),
        Case("server", "unknown model, then SIGHUP: trace kept", "ok", run=server_trace_kept),
        Case("server", "unknown model, then SIGTERM: trace kept", "ok",
             run=lambda ctx, case, t: server_trace_kept(ctx, case, t, signal.SIGTERM)),
        Case("server", "SIGTERM before any request", "ok", run=server_stopped_before_any_request),
    ]


# ----------------------------------------------------------------------------------- integrity (issue 21)
# Outputs that must not destroy what was there, a checkpoint changed under a running model,
# traces too big or inconsistent, config.json sizes out of range, prompts on stdin that are
# not text. Each case brings its own fixtures; "data loss" when a file it guards changed.


def _snapshot(paths: List[Path]) -> list:
    """What each guarded path is: its kind, its link target or bytes, a folder's listing."""
    import stat as _stat

    out = []
    for p in paths:
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            out.append(("absent", None))
            continue
        if _stat.S_ISLNK(st.st_mode):
            out.append(("link", os.readlink(p)))
        elif _stat.S_ISDIR(st.st_mode):
            out.append(("dir", sorted(os.listdir(p))))
        elif _stat.S_ISREG(st.st_mode):
            out.append(("file", p.read_bytes()))
        else:  # a pipe or device: never opened (a pipe would block), judged by what it is
            out.append(("special", _stat.S_IFMT(st.st_mode), st.st_ino))
    return out


def guarded(prepare: Callable[[Ctx, Path], Tuple[List[str], List[Path]]], *, env=None, stdin: Optional[bytes] = None):
    """``prepare(ctx, folder) -> (argv, guarded paths)``; the guarded paths must be as they
    were after the run (else "data loss"), whatever the verdict on the exit."""
    def run(ctx: Ctx, case: Case, timeout_s: float) -> Outcome:
        folder = ctx.fresh(case.name)
        argv, keep = prepare(ctx, folder)
        before = _snapshot(keep)
        e = base_env(ctx)
        if env:
            e.update(env(ctx, folder))
        if stdin is None:
            out = run_process(argv, env=e, cwd=folder, timeout_s=timeout_s)
        else:
            out = _run_with_stdin(argv, stdin, env=e, cwd=folder, timeout_s=timeout_s)
        changed = [str(p) for p, a, b in zip(keep, before, _snapshot(keep)) if a != b]
        if changed:
            out.verdict, out.note = "data loss", f"changed: {', '.join(changed)[:100]}"
        return out

    return run


def _run_with_stdin(argv: List[str], data: bytes, *, env: dict, cwd: Path, timeout_s: float) -> Outcome:
    t0 = time.monotonic()
    try:
        p = subprocess.run(argv, input=data, capture_output=True, env=env, cwd=cwd, timeout=timeout_s,
                           start_new_session=True)
    except subprocess.TimeoutExpired:
        return Outcome(None, time.monotonic() - t0, timed_out=True, note=f"no answer in {timeout_s:.0f} s")
    return Outcome(p.returncode, time.monotonic() - t0, p.stdout.decode(errors="replace"),
                   p.stderr.decode(errors="replace"))


def _private_model(ctx: Ctx, folder: Path) -> Path:
    model = folder / "model"
    shutil.copytree(ctx.model, model)
    return model


def _out_onto_shard_via_link(ctx: Ctx, folder: Path):
    model = _private_model(ctx, folder)
    (folder / "elsewhere").symlink_to(model)
    shard = shards(model)[0]
    return RUN + ["--model", str(model), "-c", "4", *GEN, "--trace-out", f"elsewhere/{shard.name}"], [shard, model]


def _out_onto_hardlinked_config(ctx: Ctx, folder: Path):
    model = _private_model(ctx, folder)
    os.link(model / "config.json", folder / "run.npz")
    return RUN + ["--model", str(model), "-c", "4", *GEN, "--trace-out", "run.npz"], [model / "config.json", model]


def _out_into_model_by_dots(ctx: Ctx, folder: Path):
    model = _private_model(ctx, folder)
    (folder / "sub").mkdir()
    return RUN + ["--model", str(model), "-c", "4", *GEN, "--trace-out", "sub/../model/run.npz"], [model]


def _out_onto_symlink(ctx: Ctx, folder: Path):
    notes = folder / "notes.txt"
    notes.write_text("three weeks of notes\n")
    (folder / "run.npz").symlink_to(notes)
    return RUN + ["--model", str(ctx.model), "-c", "4", *GEN, "--trace-out", "run.npz"], [notes, folder / "run.npz"]


def _out_onto_fifo(ctx: Ctx, folder: Path):
    os.mkfifo(folder / "pipe")
    return RUN + ["--model", str(ctx.model), "-c", "4", *GEN, "--trace-out", "pipe"], [folder / "pipe"]


def _profile_into_model(ctx: Ctx, folder: Path):
    model = _private_model(ctx, folder)
    return RUN + ["--model", str(model), "-c", "4", *GEN, "--save-profile"], [model]


FULL_DISK_AT_SAVE = """
import os, resource
from mlx_lm import generate
from golem.runtime import load
from golem.runtime.trace import load_trace
OUT = os.path.abspath("run.npz")
with load(MODEL, cache_sizes=4, trace_out=OUT) as (model, tokenizer):
    generate(model, tokenizer, "hello", max_tokens=3)
generate_ok = load_trace(OUT).num_steps
try:
    with load(MODEL, cache_sizes=4, trace_out=OUT) as (model, tokenizer):
        generate(model, tokenizer, "a longer prompt, so that this trace is larger than the first", max_tokens=40)
        HARD = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, HARD))  # the disk fills up just as the trace is saved
finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.getrlimit(resource.RLIMIT_FSIZE)[1],) * 2)
    assert load_trace(OUT).num_steps == generate_ok, "the first trace was damaged"
    assert sorted(os.listdir(".")) in (["run.npz"], [".stderr", ".stdout", "run.npz"]), sorted(os.listdir("."))
"""


def full_disk_at_save(ctx: Ctx, case: Case, timeout_s: float) -> Outcome:
    folder = ctx.fresh(case.name)
    out = run_process(library(FULL_DISK_AT_SAVE)(ctx), env=base_env(ctx), cwd=folder, timeout_s=timeout_s)
    if "the first trace was damaged" in out.stderr:
        out.verdict, out.note = "data loss", "the trace that was there is damaged"
    return out


def concurrent_trace_out(ctx: Ctx, case: Case, timeout_s: float) -> Outcome:
    """Three golem-runs writing one --trace-out at once: all finish, one of their traces is
    left, whole, and no temporary file."""
    folder = ctx.fresh(case.name)
    procs = []
    t0 = time.monotonic()
    for i in range(3):
        sub = folder / f"r{i}"
        sub.mkdir()
        procs.append(subprocess.Popen(RUN + ["--model", str(ctx.model), "-c", "4", "-p", f"story {i}", "-m", "4",
                                             "--trace-out", str(folder / "shared.npz")],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=base_env(ctx), cwd=sub))
    errs = []
    try:
        for p in procs:
            errs.append(p.communicate(timeout=max(1.0, timeout_s - (time.monotonic() - t0)))[1].decode(errors="replace"))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        return Outcome(None, time.monotonic() - t0, timed_out=True, note=f"no answer in {timeout_s:.0f} s")
    seconds = time.monotonic() - t0
    failed = [i for i, p in enumerate(procs) if p.returncode != 0]
    if failed:
        return Outcome(1, seconds, stderr=errs[failed[0]], verdict="refused", note=f"writer {failed[0]} failed")
    from golem.runtime.trace import TraceError, load_trace

    try:
        steps = load_trace(folder / "shared.npz").num_steps
    except TraceError as e:
        return Outcome(0, seconds, verdict="data loss", note=f"the trace left is unreadable: {e}")
    left = sorted(n for n in os.listdir(folder) if not n.startswith("r") and n != ".stdout" and n != ".stderr")
    if left != ["shared.npz"]:
        return Outcome(0, seconds, verdict="data loss", note=f"left behind: {left}")
    return Outcome(0, seconds, note=f"3 writers finished; the trace left has {steps} steps")


CHANGE_MID_RUN = """
import os, shutil
import mlx.core as mx
from mlx_lm.generate import generate_step
from golem.runtime import load
from golem.io.read_errors import ReadError
with load(MODEL, cache_sizes=4) as (model, tokenizer):
    tokens = mx.array(tokenizer.encode("Once upon a time there was a computer"))
    steps = generate_step(tokens, model, max_tokens=120, sampler=lambda x: mx.argmax(x, axis=-1))
    first = [int(t) for _, (t, _) in zip(range(3), steps)]
    model.golem.reader.handles.check_interval_s = 0  # (the default checks a path at most every 0.25 s)
    for shard in sorted(p for p in os.listdir(MODEL) if p.startswith("model-")):
        path = os.path.join(MODEL, shard)
        if HOW == "in place":  # same file, same size, other bytes
            with open(path, "r+b") as f:
                f.seek(os.path.getsize(path) // 2)
                f.write(os.urandom(1 << 16))
        elif HOW == "re-saved":  # new files under the same names, other bytes
            with open(path + ".new", "wb") as f, open(path, "rb") as g:
                data = bytearray(g.read())
                data[len(data) // 2:len(data) // 2 + 4096] = os.urandom(4096)
                f.write(data)
            os.replace(path + ".new", path)
        else:  # the same bytes, copied over: still not the file indexed
            shutil.copyfile(path, path + ".new")
            os.replace(path + ".new", path)
    for _ in steps:
        pass
print("generated past a changed checkpoint")
"""


def change_mid_run(how: str):
    def run(ctx: Ctx, case: Case, timeout_s: float) -> Outcome:
        folder = ctx.fresh(case.name)
        model = _private_model(ctx, folder)
        code = CHANGE_MID_RUN.replace("HOW ==", f"{how!r} ==")
        argv = library(code)(ctx)
        argv[-1] = str(model)
        out = run_process(argv, env=base_env(ctx), cwd=folder, timeout_s=timeout_s)
        if out.rc == 0 and "generated past" in out.stdout:
            out.verdict, out.note = "silent accept", "generation went on over a changed checkpoint"
        return out

    return run


def _npz_members(path: Path, members: dict, compression=None) -> Path:
    import zipfile

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED if compression is None else compression) as zf:
        for name, data in members.items():
            zf.writestr(name + ".npy", data)
    return path


def _npy_bytes(arr) -> bytes:
    import io as _io

    buf = _io.BytesIO()
    np.lib.format.write_array(buf, np.asarray(arr), allow_pickle=False)
    return buf.getvalue()


def _members(**changes) -> dict:
    arrays, meta = trace_arrays()
    meta.update(changes.pop("meta", {}))
    out = {name: _npy_bytes(a) for name, a in arrays.items()}
    out["meta"] = _npy_bytes(np.array(changes.pop("meta_raw", None) or json.dumps(meta)))
    for name, value in changes.items():
        out[name] = value if isinstance(value, bytes) else _npy_bytes(value)
    return out


def _zip_bomb(ctx: Ctx) -> Path:
    """'experts' of 3 G int16 zeros (6 GB) in a few MB: never to be expanded."""
    import zlib

    path = ctx.fresh("zip bomb") / "t.npz"
    n = 1 << 28
    header = _npy_bytes(np.zeros((0, 3, 4), np.int16))
    header_buf = __import__("io").BytesIO()
    np.lib.format.write_array_header_1_0(header_buf, {"descr": "<i2", "fortran_order": False, "shape": (n, 3, 4)})
    head = header_buf.getvalue()
    del header
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = bytes(1 << 24)
    body = [comp.compress(head)]
    crc = zlib.crc32(head)
    for _ in range((n * 3 * 4 * 2) // len(chunk)):
        body.append(comp.compress(chunk))
        crc = zlib.crc32(chunk, crc)
    body.append(comp.flush())
    data = b"".join(body)
    size = len(head) + n * 3 * 4 * 2
    members = _members()
    import zipfile

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in ("weights", "seq_offsets", "meta"):
            zf.writestr(name + ".npy", members[name])
        info = zipfile.ZipInfo("experts.npy")
        info.compress_type = zipfile.ZIP_DEFLATED
        info.file_size, info.compress_size, info.CRC = size, len(data), crc
        # a raw deflate stream written as the member's bytes: what a hostile archive holds
        zf.fp.seek(zf.start_dir)
        info.header_offset = zf.fp.tell()
        info.flag_bits = 0
        zf.fp.write(info.FileHeader(zip64=size > 0xFFFFFFFF))
        zf.fp.write(data)
        zf.start_dir = zf.fp.tell()
        zf.filelist.append(info)
        zf.NameToInfo[info.filename] = info
        zf._didModify = True
    return path


def _lying_header(ctx: Ctx) -> Path:
    buf = __import__("io").BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<i2", "fortran_order": False, "shape": (10 ** 9, 3, 4)})
    experts = buf.getvalue() + trace_arrays()[0]["experts"].tobytes()
    import zipfile

    return _npz_members(ctx.fresh("lying header") / "t.npz", _members(experts=experts), zipfile.ZIP_STORED)


def _bad_routing(name: str, **changes) -> Callable[[Ctx], Path]:
    def make(ctx: Ctx) -> Path:
        arrays, _ = trace_arrays()
        resolved = {k: (v(arrays) if callable(v) else v) for k, v in changes.items()}
        return _npz_members(ctx.fresh(name) / "t.npz", _members(**resolved))

    return make


def _dup(arrays):
    e = arrays["experts"].copy()
    e[11, 2, 3] = e[11, 2, 0]
    return e


def _negative(arrays):
    w = arrays["weights"].copy()
    w[30, 1, 2] = -0.25
    return w


def _nan_late(arrays):
    w = arrays["weights"].copy()
    w[39, 0, 0] = np.nan
    return w


def _long_trace(ctx: Ctx) -> Path:
    from golem.runtime.trace import Trace, save_trace

    path = ctx.fresh("long trace") / "long.npz"
    rng = np.random.default_rng(5)
    n, layers, experts, k = 200_000, 4, 32, 4
    logits = rng.gumbel(size=(n, layers, experts)).astype(np.float32) - np.log(np.arange(1, experts + 1, dtype=np.float32))
    ids = np.argpartition(logits, -k, axis=2)[:, :, -k:].astype(np.int16)
    save_trace(path, Trace(ids, rng.random(ids.shape, dtype=np.float32), np.array([0, n]),
                           {"num_layers": layers, "num_experts": experts, "top_k": k, "expert_bytes": 1 << 20}))
    return path


def _deep_meta(ctx: Ctx) -> Path:
    raw = '{"format": "golem-trace/1", "num_layers": 3, "num_experts": 16, "top_k": 4, "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    return _npz_members(ctx.fresh("deep meta") / "t.npz", _members(meta_raw=raw))


def _deep_config(model: Path) -> None:
    text = (model / "config.json").read_text().rstrip()
    (model / "config.json").write_text(text[:-1] + ', "extra": ' + "{\"a\": " * 50_000 + "1" + "}" * 50_000 + "}")


def integrity_cases() -> List[Case]:
    """Outputs, checkpoint identity, trace limits, config.json ranges, stdin."""
    return [
        # outputs never destroy what was there
        Case("outputs", "--trace-out: a shard, through a link to the model", "error",
             run=guarded(_out_onto_shard_via_link), quick=True, mention="model folder"),
        Case("outputs", "--trace-out: a hard link of config.json", "error",
             run=guarded(_out_onto_hardlinked_config), mention="model folder"),
        Case("outputs", "--trace-out: sub/../model/run.npz", "error",
             run=guarded(_out_into_model_by_dots), mention="model folder"),
        Case("outputs", "--trace-out: a symlink to the user's notes", "error",
             run=guarded(_out_onto_symlink), mention="symbolic link"),
        Case("outputs", "--trace-out: a named pipe", "error", run=guarded(_out_onto_fifo), mention="regular file"),
        Case("outputs", "--trace-out: /dev/null", "error", run_argv("-c", "4", *GEN, "--trace-out", "/dev/null"),
             mention="regular file", before_generation=True),
        Case("outputs", "--save-profile, golem's cache inside the model", "error",
             run=guarded(_profile_into_model, env=lambda ctx, folder: {"GOLEM_CACHE": str(folder / "model" / ".cache")}),
             mention="model folder"),
        Case("outputs", "disk full as the trace is saved (library)", "error", run=full_disk_at_save, quick=True,
             mention="cannot write .*old file is left"),
        Case("outputs", "3 golem-runs, one --trace-out, at once", "ok", run=concurrent_trace_out),
        # a checkpoint changed under a running model
        Case("checkpoint", "shards rewritten in place mid-run", "error", run=change_mid_run("in place"), quick=True,
             mention="changed on disk"),
        Case("checkpoint", "model re-saved mid-run (new files)", "error", run=change_mid_run("re-saved"),
             mention="changed on disk"),
        Case("checkpoint", "shards replaced by identical copies", "error", run=change_mid_run("copied"),
             mention="replaced by another file"),
        # traces too big or inconsistent
        Case("trace-limits", "zip bomb: 6 GB of ids in a few MB", "error", trace_argv("simulate", trace=_zip_bomb),
             quick=True, mention="compress"),
        Case("trace-limits", ".npy header claiming 10^9 steps", "error", trace_argv("stats", trace=_lying_header),
             mention="declares"),
        Case("trace-limits", "an expert twice in one step", "error",
             trace_argv("simulate", trace=_bad_routing("dup", experts=_dup)), mention="twice"),
        Case("trace-limits", "a negative router score", "error",
             trace_argv("predict", "--predictor", "frequency", trace=_bad_routing("neg", weights=_negative)),
             mention="negative"),
        Case("trace-limits", "NaN score on the last step (simulate)", "error",
             trace_argv("simulate", trace=_bad_routing("nan", weights=_nan_late)), mention="NaN"),
        Case("trace-limits", "meta top_k 6 over 4 columns", "error",
             trace_argv("stats", trace=_bad_routing("topk", meta={"top_k": 6})), mention="top_k"),
        Case("trace-limits", "meta top_k 2, four ids a step", "error",
             trace_argv("simulate", trace=_bad_routing("topk2", meta={"top_k": 2})), mention="top_k"),
        Case("trace-limits", "meta nested 100,000 deep", "error", trace_argv("stats", trace=_deep_meta),
             mention="meta"),
        Case("trace-limits", "200k-step trace: simulate in bounded memory", "ok",
             trace_argv("simulate", "-c", "8", trace=_long_trace)),
        # config.json sizes
        Case("config-range", "num_attention_heads 0", "error",
             run_argv(*GEN, model=on_variant("heads0", edit_config(num_attention_heads=0))),
             quick=True, mention="num_attention_heads"),
        Case("config-range", "decoder_sparse_step 0", "error",
             run_argv(*GEN, model=on_variant("sparse0", edit_config(decoder_sparse_step=0))), mention="decoder_sparse_step"),
        Case("config-range", "vocab_size 10^12", "error",
             run_argv(*GEN, model=on_variant("vocab", edit_config(vocab_size=10 ** 12))), mention="vocab_size"),
        Case("config-range", "num_hidden_layers 100,000", "error",
             run_argv(*GEN, model=on_variant("layers", edit_config(num_hidden_layers=100_000))), mention="num_hidden_layers"),
        Case("config-range", "num_hidden_layers 9 (4 stored)", "error",
             run_argv(*GEN, model=on_variant("layers9", edit_config(num_hidden_layers=9))), mention="stores"),
        Case("config-range", "rms_norm_eps 0", "error",
             run_argv(*GEN, model=on_variant("eps", edit_config(rms_norm_eps=0))), mention="rms_norm_eps"),
        Case("config-range", "heads 4, kv heads 3", "error",
             run_argv(*GEN, model=on_variant("kv3", edit_config(num_attention_heads=4, num_key_value_heads=3))),
             mention="multiple"),
        Case("config-range", "config.json nested 50,000 deep", "error",
             run_argv(*GEN, model=on_variant("deep", _deep_config)), mention="nested"),
        Case("config-range", "golem-trace estimate --model, heads 0", "error",
             lambda ctx: TRACE + ["estimate", "--model", str(ctx.variant("est", edit_config(num_attention_heads=0))),
                                  "--machine", "m3-max-128g"], mention="num_attention_heads"),
        # prompts on stdin that are not text
        Case("stdin", "golem-run -p - with a PNG on stdin", "error",
             run=guarded(lambda ctx, folder: (RUN + ["--model", str(ctx.model), "-c", "4", "-p", "-", "-m", "3"], []),
                         stdin=b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8), quick=True, mention="not UTF-8 text"),
        Case("stdin", "golem-run -p - with UTF-16 text", "error",
             run=guarded(lambda ctx, folder: (RUN + ["--model", str(ctx.model), "-c", "4", "-p", "-", "-m", "3"], []),
                         stdin="hello".encode("utf-16")), mention="not UTF-8 text"),
        Case("stdin", "golem-run -p - with NUL bytes", "error",
             run=guarded(lambda ctx, folder: (RUN + ["--model", str(ctx.model), "-c", "4", "-p", "-", "-m", "3"], []),
                         stdin=b"hi\x00\x00\x00"), mention="NUL"),
        Case("stdin", "golem-chat, a binary second prompt", "error",
             run=guarded(lambda ctx, folder: ([sys.executable, "-m", "golem.runtime.cli.chat", "--model", str(ctx.model),
                                               "-c", "4", "--max-tokens", "3"], []),
                         stdin=b"hello\n\xff\xfe\xfd\x00binary\nq\n"), mention="not UTF-8 text"),
        Case("stdin", "golem-run -p - with UTF-8 text", "ok",
             run=guarded(lambda ctx, folder: (RUN + ["--model", str(ctx.model), "-c", "4", "-p", "-", "-m", "3"], []),
                         stdin="Grüße, ☃\n".encode())),
    ]


# ----------------------------------------------------------------------------------- main


def run_case(ctx: Ctx, case: Case, timeout_s: float) -> tuple:
    try:
        if case.run is not None:
            out = case.run(ctx, case, timeout_s)
        else:
            env = case.env(ctx) if case.env else base_env(ctx)
            argv = case.argv(ctx)
            out = run_process(argv, env=env, cwd=ctx.fresh(case.name), timeout_s=timeout_s)
    except Exception as e:  # the harness itself failed on this case: say so, go on
        out = Outcome(None, 0.0, stderr=f"harness: {type(e).__name__}: {e}", verdict="unclear",
                      note=f"harness: {type(e).__name__}: {e}")
    return case, out, judge(case, out)


def build_fixtures(root: Path) -> Ctx:
    from golem.runtime.synthetic import build_checkpoint
    from golem.runtime.trace import Trace, save_trace

    model = build_checkpoint("qwen3_moe", root / "model")
    arrays, meta = trace_arrays()
    trace = root / "valid.npz"
    save_trace(trace, Trace(arrays["experts"], arrays["weights"], arrays["seq_offsets"], meta))
    return Ctx(root=root, model=model, trace=trace)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="One or two cases per class (a few minutes).")
    ap.add_argument("--jobs", type=int, default=2, help="Cases run at once (default 2).")
    ap.add_argument("--timeout", type=float, default=180.0, help="Seconds before a case counts as a hang.")
    ap.add_argument("--only", default=None, help="Comma-separated classes to run.")
    ap.add_argument("--match", default=None, help="Only the cases whose name matches this regular expression.")
    ap.add_argument("--dir", type=Path, default=None, help="Work folder (default: a new temporary one, removed).")
    args = ap.parse_args()
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # Started in the background: every golem-run started here would inherit SIGINT ignored
        # and the Ctrl-C cases could not judge it. Caught here, it is at its default in them.
        signal.signal(signal.SIGINT, signal.default_int_handler)

    root = args.dir or Path(tempfile.mkdtemp(prefix="golem-reliability-"))
    root.mkdir(parents=True, exist_ok=True)
    cases = [c for c in catalogue() + server_cases() if (c.quick or not args.quick)
             and (args.only is None or c.klass in args.only.split(","))
             and (args.match is None or re.search(args.match, c.name))]
    print(f"[check_reliability] {len(cases)} cases in {root}", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    ctx = build_fixtures(root)
    rows = []
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        futures = [pool.submit(run_case, ctx, c, args.timeout) for c in cases]
        for i, f in enumerate(futures):
            case, out, verdict = f.result()
            rows.append((case, out, verdict))
            print(f"[{i + 1}/{len(cases)}] {case.klass}: {case.name}: {verdict}", file=sys.stderr, flush=True)

    head = f"{'class':<12} {'case':<42} {'exit':>5} {'s':>6}  {'verdict':<14} message"
    print(head)
    print("-" * len(head))
    for case, out, verdict in rows:
        rc = "-" if out.rc is None else str(out.rc)
        flag = "" if verdict == PASS[case.expect] else " <-"
        print(f"{case.klass:<12} {case.name[:42]:<42} {rc:>5} {out.seconds:>6.1f}  {verdict:<14} "
              f"{message(out)[:110]}{flag}")
    counts = {}
    for _, _, verdict in rows:
        counts[verdict] = counts.get(verdict, 0) + 1
    failures = [f"{c.klass}: {c.name}: {v}" for c, _, v in rows if v != PASS[c.expect]]
    print(json.dumps({
        "cases": len(rows), "passed": len(rows) - len(failures), "quick": args.quick,
        "clear_errors": counts.get("clear error", 0), "ok": counts.get("ok", 0),
        "tracebacks": counts.get("traceback", 0), "hangs": counts.get("hang", 0),
        "silent_accepts": counts.get("silent accept", 0), "data_losses": counts.get("data loss", 0),
        "other": {k: v for k, v in counts.items()
                  if k not in ("clear error", "ok", "traceback", "hang", "silent accept", "data loss")},
        "failures": failures, "seconds": round(time.monotonic() - t0, 1),
    }))
    if args.dir is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
