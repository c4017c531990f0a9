"""The GIL is released, threads share an Image, a forked child uses it, Ctrl-C cancels."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import vdisk
from conftest import KINDS, GiB, MiB, make_image, map_entry, pattern, write_at

#: Ctrl-C must stop a conversion within this many seconds.
CANCEL_WITHIN = 1.0


def _slow_source(loop_device: Any, data_image: Path) -> tuple[str, bool]:
    """A source whose conversion takes many seconds: a 64 GiB sparse file behind a loop device
    (block devices are read in full, and the loop driver reads holes slowly); else the data image."""
    try:
        return loop_device(64 * GiB, read_only=True, name="slow.img"), True
    except pytest.skip.Exception:
        return str(data_image), False


class _Enough(Exception):
    """Raised from a progress callback to end a long copy once the test has seen enough."""


def test_gil_is_released_during_convert(tmp_path: Path, loop_device: Any, data_image: Path) -> None:
    """A Python thread keeps counting while convert runs: between any two progress callbacks
    (100 ms apart, while the copy runs) the counter moved."""
    src, slow = _slow_source(loop_device, data_image)
    counter = [0]
    stop = threading.Event()

    def count() -> None:
        while not stop.is_set():
            counter[0] += 1

    seen: list[tuple[int, int, int]] = []

    def progress(done: int, total: int) -> None:
        seen.append((counter[0], done, total))
        if len(seen) == 8:
            raise _Enough

    t = threading.Thread(target=count)
    t.start()
    try:
        vdisk.convert(src, tmp_path / "out.raw", threads=1, progress=progress)
    except _Enough:
        pass
    finally:
        stop.set()
        t.join()
        (tmp_path / "out.raw").unlink(missing_ok=True)
    # Calls made while the copy ran (the one at done == total comes right after it ends).
    running = [c for c, done, total in seen if done < total]
    if len(running) < 2:
        assert not slow
        pytest.skip(f"SKIP: the copy of {src} was too quick to observe ({len(running)} progress calls)")
    assert all(b > a for a, b in zip(running, running[1:])), running


def test_gil_is_released_during_reads_and_open(tmp_path: Path, data_image: Path) -> None:
    counter = [0]
    stop = threading.Event()

    def count() -> None:
        while not stop.is_set():
            counter[0] += 1

    t = threading.Thread(target=count)
    t.start()
    try:
        with vdisk.open(data_image) as img:
            before = counter[0]
            for _ in range(2):
                img.read(0, 512 * MiB)
            during = counter[0] - before
    finally:
        stop.set()
        t.join()
    assert during > 0


def test_one_image_many_threads(tmp_path: Path, raw_image: Path) -> None:
    expected = raw_image.read_bytes()
    errors: list[BaseException] = []
    with vdisk.open(raw_image) as img:
        want_map = [map_entry(e) for e in img.extents()]

        def reader(seed: int) -> None:
            rng = random.Random(seed)
            try:
                for _ in range(300):
                    off = rng.randrange(len(expected))
                    n = rng.choice([1, 4096, 100_000, 2 * MiB])
                    assert img.read(off, n) == expected[off : off + n]
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        def mapper() -> None:
            try:
                for _ in range(20):
                    assert [map_entry(e) for e in img.extents()] == want_map
                    assert img.info()["virtual-size"] == len(expected)
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        def converter(i: int) -> None:
            try:
                dst = tmp_path / f"out{i}.raw"
                vdisk.convert(raw_image, dst, threads=2)
                assert dst.read_bytes() == expected
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(6)]
        threads += [threading.Thread(target=mapper) for _ in range(2)]
        threads += [threading.Thread(target=converter, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors


def test_one_extent_iterator_shared_by_threads(tmp_path: Path) -> None:
    path = write_at(tmp_path / "many.raw", 8000 * 64 * 1024, [(i * 128 * 1024, b"x" * 4096) for i in range(4000)])
    with vdisk.open(path) as img:
        want = list(img.extents())
        it = img.extents()
        got: list[vdisk.Extent] = []
        lock = threading.Lock()

        def pull() -> None:
            while True:
                try:
                    e = next(it)
                except StopIteration:
                    return
                except ValueError:  # another thread is fetching the next batch
                    time.sleep(0.001)
                    continue
                with lock:
                    got.append(e)

        threads = [threading.Thread(target=pull) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert sorted(got, key=lambda e: e.start) == want


def test_close_while_other_threads_read(raw_image: Path) -> None:
    img = vdisk.open(raw_image)
    outcomes: list[str] = []

    def reader() -> None:
        for _ in range(2000):
            try:
                img.read(0, 64 * 1024)
            except ValueError:
                outcomes.append("closed")
                return
        outcomes.append("done")

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.01)
    img.close()
    for t in threads:
        t.join()
    assert len(outcomes) == 4 and set(outcomes) <= {"closed", "done"}


# --- fork --------------------------------------------------------------------------------------

_FORK_IMAGE: Any = None


def _use_in_child(dst: str) -> tuple[str, int, list[dict[str, Any]], int]:
    img = _FORK_IMAGE
    digest = hashlib.sha256(img.read(0, img.virtual_size)).hexdigest()
    report = vdisk.convert(img.path, dst, progress=lambda d, t: None)
    return digest, report.bytes_written, [map_entry(e) for e in img.extents()], os.getpid()


@pytest.mark.parametrize("kind", KINDS)
def test_image_used_after_fork(kind: str, tmp_path: Path, raw_image: Path) -> None:
    """An Image opened before fork (as in an Airflow worker) works in the child, even while another
    parent thread was reading from it at the time of the fork."""
    global _FORK_IMAGE
    path = make_image(kind, tmp_path, raw_image)
    img = vdisk.open(path)
    expected = img.read(0, img.virtual_size)
    _FORK_IMAGE = img
    stop = threading.Event()

    def busy() -> None:
        while not stop.is_set():
            img.read(0, 4 * MiB)
            list(img.extents())

    t = threading.Thread(target=busy)
    t.start()
    try:
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(2) as pool:
            targets = [str(tmp_path / f"child{i}.raw") for i in range(4)]
            # A deadlock in the child (a lock held by a parent thread at fork) fails, not hangs.
            results = pool.map_async(_use_in_child, targets, chunksize=1).get(timeout=120)
    finally:
        stop.set()
        t.join()
    want = hashlib.sha256(expected).hexdigest()
    want_map = [map_entry(e) for e in img.extents()]
    for digest, written, extents, pid in results:
        assert digest == want
        assert written > 0
        assert extents == want_map
        assert pid != os.getpid()
    for i in range(4):
        assert (tmp_path / f"child{i}.raw").read_bytes() == expected
    img.close()
    _FORK_IMAGE = None


# --- Ctrl-C ------------------------------------------------------------------------------------


def test_ctrl_c_cancels_convert_within_a_second(tmp_path: Path, loop_device: Any, sigint_raises: None) -> None:
    # Only with a source that surely outlasts the signal: a SIGINT that arrived after convert
    # returned would interrupt whatever runs next.
    src = loop_device(64 * GiB, read_only=True, name="slow.img")
    sent: list[float] = []
    calls: list[tuple[float, int, int]] = []

    def interrupt() -> None:
        sent.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGINT)

    def progress(done: int, total: int) -> None:
        calls.append((time.monotonic(), done, total))
        if len(calls) == 1:
            timer.start()  # the copy is running: interrupt it shortly

    timer = threading.Timer(0.3, interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            vdisk.convert(src, tmp_path / "out.raw", threads=2, progress=progress)
        caught = time.monotonic()
    finally:
        timer.cancel()
    assert sent, "the signal was never sent"
    assert caught - sent[0] < CANCEL_WITHIN, f"convert took {caught - sent[0]:.2f} s to stop"
    assert calls[-1][1] < calls[-1][2], "the copy ran to the end"
    assert all(t <= caught for t, _, _ in calls)


def test_ctrl_c_without_progress_callback(tmp_path: Path, loop_device: Any, sigint_raises: None) -> None:
    """Signals are checked even when the caller passed no progress callback."""
    src = loop_device(64 * GiB, read_only=True, name="slow.img")
    sent: list[float] = []

    def interrupt() -> None:
        sent.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGINT)

    timer = threading.Timer(1.0, interrupt)
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            vdisk.convert(src, tmp_path / "out.raw")
        caught = time.monotonic()
    finally:
        timer.cancel()
    assert sent and caught - sent[0] < CANCEL_WITHIN


def test_raising_signal_handler_cancels_convert(tmp_path: Path, loop_device: Any) -> None:
    """Any Python signal handler that raises stops the copy, e.g. a SIGALRM timeout (Airflow's
    execution_timeout works this way)."""
    src = loop_device(64 * GiB, read_only=True, name="slow.img")

    class Timeout(Exception):
        pass

    def on_alarm(signum: int, frame: object) -> None:
        raise Timeout

    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        started = time.monotonic()
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        with pytest.raises(Timeout):
            vdisk.convert(src, tmp_path / "out.raw")
        assert time.monotonic() - started < 0.5 + CANCEL_WITHIN
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_exception_in_progress_cancels_the_copy(tmp_path: Path, loop_device: Any, data_image: Path) -> None:
    src, slow = _slow_source(loop_device, data_image)
    raised_at: list[float] = []
    calls: list[int] = []

    def progress(done: int, total: int) -> None:
        calls.append(done)
        if len(calls) == 2:
            raised_at.append(time.monotonic())
            raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        vdisk.convert(src, tmp_path / "out.raw", threads=1, progress=progress)
    assert time.monotonic() - raised_at[0] < CANCEL_WITHIN
    assert len(calls) == 2, "progress was called again after it raised"
    if slow:
        assert calls[-1] < 64 * GiB


def test_after_cancel_the_module_still_works(tmp_path: Path, raw_image: Path) -> None:
    def progress(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        vdisk.convert(raw_image, tmp_path / "a.raw", progress=progress)
    vdisk.convert(raw_image, tmp_path / "b.raw")
    assert (tmp_path / "b.raw").read_bytes() == raw_image.read_bytes()
    assert pattern(4, 1) == raw_image.read_bytes()[:4]
