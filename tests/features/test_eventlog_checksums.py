"""Event-log parts carry a sha256 checksum: a changed, truncated or unreadable part is refused
with one error naming the file, an old log without checksums still reads and can be
repaired, and a crash at any step of an append or an erasure leaves parts that verify."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest

from features.eventlog import FORMAT_FILE, EventLog, EventLogBusy, EventLogCorrupt
from features.events import MS_PER_DAY, EventBatch
from features.logcheck import QUARANTINE_DIR, check_log
from features.part_checksum import file_sha256, parse_sidecar, sidecar_of
from test_eventlog import T0, as_sorted_table, make_batch


def parts(root: Path) -> list[Path]:
    return sorted(root.glob("day=*/part-*.parquet"))


def old_style_log(root: Path, batch: EventBatch) -> EventLog:
    """A log as the code before checksums wrote it: the same part files, no sidecars, no marker."""
    log = EventLog(root)
    log.append(batch)
    for side in root.glob("day=*/*.sha256"):
        side.unlink()
    (root / FORMAT_FILE).unlink()
    return log


def flip_bit_that_still_reads(part: Path) -> int:
    """Flip one bit near the middle of ``part`` (inside a column chunk's data) such that both
    pyarrow and DuckDB still read the file without complaint, but other values come out:
    the silent corruption a checksum exists for. Returns the offset."""
    data = part.read_bytes()
    good = pq.read_table(part)
    for off in range(len(data) // 2, len(data) * 3 // 4):
        bad = bytearray(data)
        bad[off] ^= 0x01
        part.write_bytes(bytes(bad))
        try:
            pq.read_table(part)
            t = duckdb.sql(f"SELECT * FROM read_parquet('{part}')").to_arrow_table()
        except (OSError, ValueError, duckdb.Error):
            continue
        if not t.equals(good):
            return off
    part.write_bytes(data)
    raise AssertionError("no bit flip that keeps the part readable was found")


# ------------------------------------------------------------------ writing


def test_every_part_is_written_with_a_sha256sum_sidecar_and_a_new_log_is_marked(tmp_path: Path) -> None:
    log = EventLog(tmp_path)
    log.append(make_batch())
    log.append(make_batch(seed=2, first_id=10_000))
    assert (tmp_path / FORMAT_FILE).is_file() and log.requires_checksums
    assert len(parts(tmp_path)) == 6
    for p in parts(tmp_path):
        assert parse_sidecar(sidecar_of(p).read_text(), p.name) == (file_sha256(p),)
    assert not list(tmp_path.glob("day=*/part-*.sha256.parquet"))  # readers' glob never sees a sidecar
    assert check_log(log).ok and check_log(log).verified == 6


# ------------------------------------------------------------------ corruption is refused


def test_a_bit_flip_that_still_reads_as_parquet_is_refused_naming_the_file(tmp_path: Path) -> None:
    log = EventLog(tmp_path)
    b = make_batch(n=3000)
    log.append(b)
    victim = parts(tmp_path)[1]  # 2026-01-06
    flip_bit_that_still_reads(victim)
    for read in (log.read, log.count, lambda: log.read(user_ids=[3]), lambda: log.read(start_ts=T0 + MS_PER_DAY)):
        with pytest.raises(EventLogCorrupt) as e:
            read()
        assert e.value.path == victim and "sha256" in e.value.reason
        assert str(victim) in str(e.value) and "backup" in str(e.value) and "--quarantine" in str(e.value)
        assert isinstance(e.value, ValueError) and "\n" not in str(e.value)
    # days the read does not open are not hashed: a slice of other days still reads
    day1 = log.read(end_ts=T0 + MS_PER_DAY)
    assert len(day1) == int((b.ts < T0 + MS_PER_DAY).sum()) > 0


def test_a_flip_that_breaks_the_parquet_is_refused(tmp_path: Path) -> None:
    log = EventLog(tmp_path)
    log.append(make_batch())
    victim = parts(tmp_path)[0]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF  # the closing "PAR1" magic
    victim.write_bytes(bytes(data))
    with pytest.raises(EventLogCorrupt, match="sha256") as e:
        log.read()
    assert e.value.path == victim


def test_a_truncated_part_is_refused(tmp_path: Path) -> None:
    log = EventLog(tmp_path)
    log.append(make_batch())
    victim = parts(tmp_path)[2]
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    with pytest.raises(EventLogCorrupt) as e:
        log.max_ts()  # reads the last day only
    assert e.value.path == victim


def test_a_truncated_part_of_an_old_log_is_one_error_naming_it_not_a_duckdb_error(tmp_path: Path) -> None:
    log = old_style_log(tmp_path, make_batch())
    victim = parts(tmp_path)[1]
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    for read in (log.read, log.count, lambda: log.delete_user(3, reason="test")):
        with pytest.raises(EventLogCorrupt, match="not readable Parquet") as e:
            read()
        assert e.value.path == victim
    rep = check_log(log)
    assert [(f.kind, f.path) for f in rep.errors] == [("corrupt", victim)]


def test_a_deleted_checksum_file_is_refused_in_a_checksummed_log_and_repair_records_it(tmp_path: Path) -> None:
    log = EventLog(tmp_path)
    b = make_batch()
    log.append(b)
    victim = parts(tmp_path)[0]
    sidecar_of(victim).unlink()
    with pytest.raises(EventLogCorrupt, match="no checksum file.*--repair") as e:
        log.read()
    assert e.value.path == victim
    assert [(f.kind, f.path) for f in check_log(log).errors] == [("no-checksum", victim)]
    fixed = check_log(log, repair=True)
    assert fixed.ok and fixed.findings[0].action
    assert log.read().to_arrow().equals(as_sorted_table(b))


def test_a_malformed_or_misplaced_checksum_file_is_refused(tmp_path: Path) -> None:
    log = EventLog(tmp_path)
    log.append(make_batch())
    a, b = parts(tmp_path)[:2]
    sidecar_of(a).write_text(sidecar_of(b).read_text())  # b's checksum beside a
    with pytest.raises(EventLogCorrupt, match="malformed.*not 'part-") as e:
        log.read()
    assert e.value.path == a


def test_an_old_log_without_checksums_reads_and_repair_makes_it_checked(tmp_path: Path) -> None:
    b = make_batch()
    log = old_style_log(tmp_path, b)
    assert not log.requires_checksums
    assert log.read().to_arrow().equals(as_sorted_table(b))  # still reads
    rep = check_log(log)
    assert rep.ok and {f.kind for f in rep.findings} == {"no-checksum"} and len(rep.findings) == 3
    log.append(make_batch(seed=4, first_id=50_000))  # new parts get checksums; the log stays lenient
    assert not log.requires_checksums and len(check_log(log).findings) == 3
    fixed = check_log(log, repair=True)
    assert fixed.requires_checksums and fixed.ok
    assert check_log(log).findings == () and check_log(log).verified == 6
    flip_bit_that_still_reads(parts(tmp_path)[0])
    with pytest.raises(EventLogCorrupt):
        log.read()


def test_repair_never_gives_a_corrupt_part_a_new_checksum(tmp_path: Path) -> None:
    log = EventLog(tmp_path)
    log.append(make_batch())
    victim = parts(tmp_path)[0]
    before = sidecar_of(victim).read_text()
    flip_bit_that_still_reads(victim)
    rep = check_log(log, repair=True)
    assert [(f.kind, f.path, f.action) for f in rep.errors] == [("corrupt", victim, "")]
    assert sidecar_of(victim).read_text() == before
    with pytest.raises(EventLogCorrupt):
        log.read()


def test_quarantine_moves_a_corrupt_part_out_of_the_log_and_audits_it(tmp_path: Path) -> None:
    log = EventLog(tmp_path)
    b = make_batch()
    log.append(b)
    victim = parts(tmp_path)[1]
    victim_rows = pq.read_table(victim).column("event_id").to_numpy()
    flip_bit_that_still_reads(victim)
    rep = check_log(log, quarantine=True)
    assert rep.ok and rep.findings[0].action.startswith("moved to")
    moved = tmp_path / QUARANTINE_DIR / victim.parent.name
    assert (moved / victim.name).is_file() and (moved / sidecar_of(victim).name).is_file() and not victim.exists()
    keep = np.flatnonzero(~np.isin(b.event_id, victim_rows))
    assert log.read().to_arrow().equals(as_sorted_table(b.take(keep)))
    assert "quarantine" in (tmp_path / "_audit" / "quarantine.jsonl").read_text()


def test_delete_user_refuses_a_corrupt_log_before_changing_anything(tmp_path: Path) -> None:
    log = EventLog(tmp_path)
    log.append(make_batch())
    flip_bit_that_still_reads(parts(tmp_path)[2])
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(EventLogCorrupt):
        log.delete_user(3, reason="erasure")
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_delete_user_keeps_every_checksum_consistent(tmp_path: Path) -> None:
    log = EventLog(tmp_path)
    log.append(make_batch(n=900, users=6))
    log.append(EventBatch.from_rows([dict(event_id=10**6, ts=T0 + 10, user_id=11, item_id=1, type="like", value=1.0)]))
    log.delete_user(3, reason="erasure")
    log.delete_user(11, reason="erasure")  # its part is left empty and removed, with its sidecar
    rep = check_log(log)
    assert rep.findings == () and rep.verified == len(parts(tmp_path)) == 3
    assert len(list(tmp_path.glob("day=*/*.sha256"))) == 3


# ------------------------------------------------------------------ crash windows

_CRASHED = 77


def run_until_crash(step: int, op: Callable[[], object]) -> bool:
    """Run ``op`` in a forked child that dies at once (os._exit: no cleanup, no finally, as if
    the machine lost power to this process) just before its ``step``-th rename or unlink, the
    operations that change what a reader can see. True if ``op`` finished first."""
    pid = os.fork()
    if pid == 0:  # the child
        code = 1
        try:
            seen = 0

            def gate(real: Callable) -> Callable:
                def call(*a, **k):
                    nonlocal seen
                    seen += 1
                    if seen == step:
                        os._exit(_CRASHED)
                    return real(*a, **k)
                return call

            os.replace, os.unlink = gate(os.replace), gate(os.unlink)
            op()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    assert code in (0, _CRASHED), f"the child failed with exit code {code}"
    return code == 0


def assert_verifies(log: EventLog) -> None:
    rep = check_log(log)
    assert rep.ok, rep.errors
    assert {f.kind for f in rep.findings} <= {"orphan", "temp", "pending"}


def test_a_crash_at_any_step_of_an_append_leaves_a_log_that_verifies(tmp_path: Path) -> None:
    first, second = make_batch(seed=1), make_batch(seed=2, first_id=10_000)
    days_of_second = sorted(set((second.ts // MS_PER_DAY).tolist()))
    template = tmp_path / "template"
    EventLog(template).append(first)
    for existing in (False, True):  # the first append (which also marks the log) and a later one
        step = 1
        while True:
            root = tmp_path / f"{existing}-{step}"
            if existing:
                shutil.copytree(template, root)
            log = EventLog(root)
            finished = run_until_crash(step, lambda: log.append(second))
            assert_verifies(log)
            got = log.read()
            new = got.take(np.flatnonzero(got.event_id >= 10_000))
            for day in days_of_second:  # each day's new part is wholly there or wholly absent
                n = int((new.ts // MS_PER_DAY == day).sum())
                assert n in (0, int((second.ts // MS_PER_DAY == day).sum()))
            if existing:
                assert len(got) - len(new) == len(first)
            check_log(log, repair=True)
            assert check_log(log).findings == ()
            if finished:
                assert len(new) == len(second)
                break
            step += 1
        assert step == (8 if not existing else 7)  # sidecar and part renames for 3 days (+ the new log's marker), then done


def test_a_crash_at_any_step_of_delete_user_leaves_a_log_that_verifies_and_rerunning_finishes(tmp_path: Path) -> None:
    b = make_batch(n=900, users=6)
    solo = EventBatch.from_rows([dict(event_id=10**6, ts=T0 + 10, user_id=3, item_id=1, type="like", value=1.0)])
    others = b.take(np.flatnonzero(b.user_id != 3))
    template = tmp_path / "template"  # one log copied for every step, so step k is the same operation each time
    EventLog(template).append(b)
    EventLog(template).append(solo)  # a part holding only user 3: the erasure removes it
    step = 1
    while True:
        root = tmp_path / str(step)
        shutil.copytree(template, root)
        log = EventLog(root)
        finished = run_until_crash(step, lambda: log.delete_user(3, reason="erasure"))
        assert_verifies(log)
        got = log.read()
        rest = got.take(np.flatnonzero(got.user_id != 3))
        assert rest.to_arrow().equals(as_sorted_table(others))  # nobody else's events lost or doubled
        log.delete_user(3, reason="erasure, again")
        assert log.read().to_arrow().equals(as_sorted_table(others))
        check_log(log, repair=True)
        final = check_log(log)
        assert final.findings == () and final.verified == len(parts(root))
        if finished:
            break
        step += 1
    assert step == 12  # three renames for each of the 3 rewritten parts, two unlinks for the removed one, then done


def test_reads_during_concurrent_erasures_see_sound_parts_never_corruption_or_a_torn_file(tmp_path: Path) -> None:
    # Readers take no lock: an erasure renames parts over (updating their sidecars around the
    # rename) while a reader hashes them and DuckDB opens them (more than once per file).
    # A read must then either retry and succeed, or say the log is busy: never call a sound
    # part corrupt, never fail inside DuckDB, never return rows from two versions of a file.
    log = EventLog(tmp_path)
    b = make_batch(n=20_000, days=3, users=200)
    log.append(b)
    erased = list(range(1, 21))
    others = as_sorted_table(b.take(np.flatnonzero(~np.isin(b.user_id, erased))))
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            for user in erased:
                log.delete_user(user, reason="concurrent erasure")
            code = 0
        finally:
            os._exit(code)
    ok = busy = 0
    status = None
    while status is None:  # read until the erasures are over, then once more
        done, st = os.waitpid(pid, os.WNOHANG)
        status = st if done else None
        try:
            got = log.read()
        except EventLogBusy:
            busy += 1
            continue
        ok += 1
        keep = np.flatnonzero(~np.isin(got.user_id, erased))
        assert got.take(keep).to_arrow().equals(others)  # everyone else's rows, exactly once
    print(f"{ok} reads, {busy} busy")
    assert os.waitstatus_to_exitcode(status) == 0 and ok > 0
    assert check_log(log).findings == () and len(log.read(user_ids=erased)) == 0
