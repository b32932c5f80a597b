"""finetune in several processes (torch.distributed, gloo on CPU): two processes train as one with the same
global batch, resume bit for bit, hand a checkpoint to one process, and a killed process ends the others with
one line instead of a hang."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from toolkit.gguf_io import open_gguf
from toolkit.train.checkpoint import load_checkpoint
from toolkit.train.finetune import FinetuneConfig, finetune

TEXT = "".join(f"<q>what is {a} times {b}?\n{a * b}\n" for a in range(2, 7) for b in range(2, 5))
# 4 samples x 2 accumulated batches per iteration: each of 2 processes takes 2 rows of every batch
OPTS = dict(sample_start="<q>", ctx=24, batch=4, grad_acc=2, adam_alpha=0.01, warmup=2, cos_decay_steps=10,
            lora_r=4, lora_alpha=8, save_every=2, threads=1, seed=11, quiet=True, sample_random_offsets=True)


def _flags(**kw) -> list[str]:
    out = []
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            out.append(flag)
        elif v is not False:
            out += [flag, str(v)]
    return out


def _files(tmp: Path, tag: str, model: Path, **kw) -> dict:
    return {**dict(model_base=str(model), train_data=str(tmp / "data.txt"), checkpoint_in=str(tmp / "none.gguf"),
                   checkpoint_out=str(tmp / f"ck-{tag}-ITERATION.gguf"),
                   lora_out=str(tmp / f"lora-{tag}-ITERATION.gguf"), log_file=str(tmp / f"log-{tag}.jsonl")), **kw}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _nproc(n: int, opts: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    """`toolkit finetune --nproc n ...` in a subprocess (torch.distributed.run starts the processes). A run that
    outlives `timeout` fails the test with every process's Python stack: the launcher and its workers (one
    session) get SIGABRT, which PYTHONFAULTHANDLER turns into a traceback dump on stderr."""
    opts = {"dist_timeout": 120, **opts}  # a stuck collective becomes the workers' own error line before `timeout`
    cmd = [sys.executable, "-m", "toolkit.cli", "finetune", "--nproc", str(n), *_flags(**opts)]
    # (cwd: `python -m` puts it first on sys.path; the processes must import the toolkit under test)
    p = subprocess.Popen(cmd, env=dict(_env(), PYTHONFAULTHANDLER="1"), cwd=Path(opts["log_file"]).parent,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in [*_descendants(p.pid), p.pid]:  # (torchrun starts each worker in a session of its own)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGABRT)
        out, err = p.communicate()
        raise AssertionError(f"finetune --nproc {n} still running after {timeout:g} s; its stacks:\n{err[-12000:]}")
    assert p.returncode == 0, err[-3000:]
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def _descendants(pid: int) -> list[int]:
    """The processes under `pid`, children first (from /proc: Linux)."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            parent[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    kids = [c for c, pp in parent.items() if pp == pid]
    return kids + [g for c in kids for g in _descendants(c)]


def _losses(log: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, log.read_text().splitlines()) if "loss" in r]


def _lora(path: Path) -> dict[str, np.ndarray]:
    return {n: np.array(t.data) for n, t in open_gguf(path).tensors.items()}


def _close(a: dict[str, np.ndarray], b: dict[str, np.ndarray], rel: float) -> bool:
    """Every tensor within `rel` of its largest value."""
    return a.keys() == b.keys() and all(np.abs(a[k] - b[k]).max() <= rel * max(np.abs(b[k]).max(), 1e-6) for k in a)


def test_two_processes_train_as_one_resume_exactly_and_hand_over_to_one(tmp_path, tiny_llama):
    (tmp_path / "data.txt").write_text(TEXT)
    # one process in passes of 2 rows (--micro-batch) does the arithmetic of two processes with 2 rows each: the
    # same [2, T] forward and backward per half, gradients scaled by powers of two (exact), the halves added in
    # one addition (commutative); with Adam, which divides each entry's step by its gradient's magnitude, any
    # other summation order shows where an entry nearly cancels (whole batch in one pass: seen 6e-3 of a tensor's
    # scale), so the equality is asserted on this arithmetic, with no grad-acc (which would change the order)
    opts = dict(OPTS, grad_acc=1, micro_batch=2)
    one = finetune(FinetuneConfig(**_files(tmp_path, "one", tiny_llama), adam_iter=4, **opts))
    _nproc(2, dict(**_files(tmp_path, "two", tiny_llama), adam_iter=4, **opts))
    two = _losses(tmp_path / "log-two.jsonl")
    assert len(two) == 4 and two == one.losses
    a1, a2 = _lora(tmp_path / "lora-one-4.gguf"), _lora(tmp_path / "lora-two-4.gguf")
    assert a1.keys() == a2.keys() and all(np.array_equal(a1[k], a2[k]) for k in a1)
    assert _lora(tmp_path / "lora-two-LATEST.gguf").keys() == _lora(tmp_path / "lora-two-4.gguf").keys()

    # stop + resume on the same number of processes: bit for bit (two ranks' all-reduce adds two numbers)
    ck2 = tmp_path / "ck-two-2.gguf"
    saved = load_checkpoint(ck2)
    assert saved.state.iteration == 2 and "rank1.torch" in saved.rng  # each process's dropout stream
    _nproc(2, dict(**_files(tmp_path, "two-resumed", tiny_llama, checkpoint_in=str(ck2)), adam_iter=2,
                   **dict(opts, seed=999)))  # the checkpoint's shuffle state wins over a new seed
    assert _losses(tmp_path / "log-two-resumed.jsonl") == two[2:]
    a, b = _lora(tmp_path / "lora-two-4.gguf"), _lora(tmp_path / "lora-two-resumed-4.gguf")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)

    # a two-process checkpoint continues in one process: its counters and shuffle are global (and with the
    # same passes, the arithmetic is the same: bit for bit)
    solo = finetune(FinetuneConfig(**_files(tmp_path, "solo", tiny_llama, checkpoint_in=str(ck2)), adam_iter=2,
                                   **opts))
    assert solo.iteration == 4 and solo.losses == two[2:]
    c = _lora(tmp_path / "lora-solo-4.gguf")
    assert c.keys() == a.keys() and all(np.array_equal(c[k], a[k]) for k in a)


def test_two_processes_lbfgs_update_equals_one(tmp_path, tiny_llama):
    """L-BFGS (several forward/backward passes an iteration, each all-reduced) moves the adapter linearly in the
    gradient, so the two-process adapter must equal the single process's to float32 summation order. Records
    with masked prompts of different lengths give the two shares of a batch different numbers of counted tokens:
    each share's loss must be weighted by the whole batch's count (a mean of the shares' means would differ)."""
    rows = [{"prompt": "q " * (1 + i % 5) + f"{i}+{i}?", "completion": " " + str(2 * i) * (1 + i % 3)}
            for i in range(10)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    opts = dict(OPTS, use_lbfgs=True, lbfgs_iter=3, adam_alpha=1.0, sample_start="")
    data = str(tmp_path / "data.jsonl")
    one = finetune(FinetuneConfig(**_files(tmp_path, "one", tiny_llama, train_data=data), **opts))
    _nproc(2, dict(**_files(tmp_path, "two", tiny_llama, train_data=data), **opts))
    # seen: equal losses, adapters within 6e-7 of each tensor's scale; 1e-5 allowed
    assert np.allclose(_losses(tmp_path / "log-two.jsonl"), one.losses, rtol=1e-5, atol=0)
    assert _close(_lora(tmp_path / "lora-two-3.gguf"), _lora(tmp_path / "lora-one-3.gguf"), 1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_killed_process_ends_the_others_with_one_line(tmp_path, tiny_llama):
    """Two ranks started as torchrun would (env vars, gloo rendezvous on a free loopback port); rank 1 is killed
    mid-run. Rank 0 must not hang: it exits non-zero with one line, and the last checkpoint it wrote loads."""
    (tmp_path / "data.txt").write_text(TEXT)
    opts = dict(**_files(tmp_path, "k", tiny_llama), adam_iter=1000, dist_timeout=60, **dict(OPTS, save_every=1))
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(_env(), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-m", "toolkit.train.finetune", *_flags(**opts)], env=env,
                                      cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        log = tmp_path / "log-k.jsonl"
        deadline = time.monotonic() + 240
        while not (log.is_file() and len(_losses(log)) >= 2):
            assert time.monotonic() < deadline and procs[0].poll() is None, "the run did not start"
            time.sleep(0.2)
        os.kill(procs[1].pid, signal.SIGKILL)
        _, err = procs[0].communicate(timeout=120)  # a hang fails here
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    lines = err.strip().splitlines()
    assert procs[0].returncode == 1 and "Traceback" not in err, err[-2000:]
    assert lines[-1].startswith("toolkit: error: rank 0: another finetune process stopped"), lines[-1]
    latest = load_checkpoint(tmp_path / "ck-k-LATEST.gguf")  # written atomically: intact whatever the kill hit
    assert latest.state.iteration >= 2
    assert _lora(tmp_path / f"lora-k-{latest.state.iteration}.gguf")
