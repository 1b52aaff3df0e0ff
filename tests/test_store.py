"""The record store and delta files on disk: guarded record writes, stale temp files, non-object JSON, broken
delta files, file modes and what a delta says about its backbone's weights."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from conftest import make_vit
from test_leaderboard import make_record

import vpeft
from vpeft.core import mark_weights
from vpeft.errors import DataError, VpeftError
from vpeft.results import RecordError, read_record, record_path, validate, write_record, write_record_guarded
from vpeft.results.store import STALE_TMP_SECONDS, atomic_path, iter_records, lock_path, write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
NON_OBJECTS = ["null", "7", "2.5", "true", '"a string"', "[]", '[{"status": "ok"}]']


def ok_record(top1: float = 70.0) -> dict:
    return make_record(top1=top1)


def failed_record(status: str = "failed") -> dict:
    return make_record(status=status, error=f"{status}: boom")


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


# -- guarded record writes -------------------------------------------------------------------------


@pytest.mark.parametrize("status", ["failed", "interrupted"])
def test_guarded_write_keeps_a_finished_record(tmp_path, status):
    path = tmp_path / "r.json"
    assert write_record_guarded(path, ok_record(71.0)) == (path, True)
    before = path.read_bytes()
    assert write_record_guarded(path, failed_record(status)) == (path, False)
    assert path.read_bytes() == before
    assert read_record(path)["metrics"]["top1"] == 71.0
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == ["r.json"]  # no temp left


def test_guarded_write_replaces_what_is_not_a_finished_record(tmp_path):
    path = tmp_path / "r.json"
    assert write_record_guarded(path, failed_record("interrupted"))[1]
    assert write_record_guarded(path, failed_record("failed"))[1]  # unfinished over unfinished
    assert read_record(path)["status"] == "failed"
    assert write_record_guarded(path, ok_record(60.0))[1]
    assert write_record_guarded(path, ok_record(65.0))[1]  # a deliberate rerun replaces ok with ok
    assert read_record(path)["metrics"]["top1"] == 65.0
    for broken in ("", '{"status": "ok", "trunc', "null", json.dumps({"status": "ok"})):  # unreadable or invalid
        path.write_text(broken)
        assert write_record_guarded(path, failed_record())[1], broken
        assert read_record(path)["status"] == "failed"


def test_guarded_write_refuses_invalid_records_and_hides_its_lock(tmp_path):
    path = record_path(tmp_path, ok_record())
    with pytest.raises(RecordError):
        write_record_guarded(path, {**failed_record(), "error": None})
    write_record_guarded(path, ok_record())
    assert lock_path(path).is_file() and lock_path(path).name.startswith(".")
    assert [p for p, _ in iter_records(tmp_path)] == [path]  # record readers never see the lock file


WRITER = """
import json, sys, time
from pathlib import Path
from vpeft.results import write_record_guarded
path, record_file, done, folder = sys.argv[1], sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])
record = json.loads(Path(record_file).read_text())
(folder / ("ready-" + record["status"])).touch()
while not (folder / "go").exists():
    time.sleep(0.001)
refused = 0
if record["status"] == "ok":  # write N times, then say so
    for i in range(40):
        record["metrics"]["top1"] = float(i)
        write_record_guarded(path, record)
    done.touch()
else:  # write until the ok writer is done, then a few more times
    i, after = 0, 0
    while after < 5:
        after += done.exists()
        record["error"] = f"failed #{i}"
        refused += not write_record_guarded(path, record)[1]
        i += 1
print(refused)
"""


def test_concurrent_ok_and_failed_writers_never_corrupt_or_unfinish(tmp_path):
    """Two real processes write one record path; a reader watches: always whole JSON, never ok then not ok."""
    path = tmp_path / "runs" / "r.json"
    records = {}
    for status, record in (("ok", ok_record()), ("failed", failed_record())):
        records[status] = tmp_path / f"{status}-record.json"
        records[status].write_text(json.dumps(record))
    done = tmp_path / "done"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), str(records[s]), str(done), str(tmp_path)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for s in ("failed", "ok")
    ]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready-{s}").exists() for s in ("ok", "failed")):
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        assert time.monotonic() < deadline, "the writers did not start"
        time.sleep(0.01)
    (tmp_path / "go").touch()
    seen_ok, reads = False, 0
    while any(p.poll() is None for p in procs):
        if path.exists():
            record = validate(json.loads(path.read_text()))  # never partial, never invalid
            reads += 1
            seen_ok = seen_ok or record["status"] == "ok"
            assert not (seen_ok and record["status"] != "ok"), "a finished record was replaced by a failed one"
        time.sleep(0.001)
        assert time.monotonic() < deadline, "the writers did not finish"
    outs = [p.communicate() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    final = read_record(path)
    assert final["status"] == "ok" and final["metrics"]["top1"] == 39.0
    assert int(outs[0][0]) >= 5  # the failed writer's last writes were all refused
    assert reads > 0
    assert sorted(p.name for p in path.parent.iterdir()) == [".r.json.lock", "r.json"]


# -- stale temp files ------------------------------------------------------------------------------


def plant(path: Path, age: float) -> Path:
    path.write_text("partial")
    then = time.time() - age
    os.utime(path, (then, then))
    return path


def test_stale_temp_files_of_the_target_are_removed(tmp_path):
    old = plant(tmp_path / ".r.json.k1l2m3n4.tmp", STALE_TMP_SECONDS + 60)
    fresh = plant(tmp_path / ".r.json.a9b8c7d6.tmp", 60)  # maybe a live writer's
    other = plant(tmp_path / ".s.json.zzzzzzzz.tmp", 10 * STALE_TMP_SECONDS)  # another target's: not ours
    write_json_atomic(tmp_path / "r.json", {"a": 1})
    assert not old.exists() and fresh.exists() and other.exists()
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1}


def test_stale_temp_files_of_a_delta_are_removed(tmp_path):
    old = plant(tmp_path / ".d.safetensors.q1w2e3r4.tmp", 2 * STALE_TMP_SECONDS)
    fresh = plant(tmp_path / ".d.safetensors.t5y6u7i8.tmp", 5)
    vpeft.save_delta(vpeft.apply_method(make_vit(), "bitfit"), tmp_path / "d.safetensors")
    assert not old.exists() and fresh.exists()


# -- JSON values that are not objects --------------------------------------------------------------


@pytest.mark.parametrize("text", NON_OBJECTS)
def test_read_record_of_a_non_object_is_a_record_error(tmp_path, text):
    path = tmp_path / "final-seed0-abc.json"
    path.write_text(text)
    with pytest.raises(RecordError, match="not a JSON object"):
        read_record(path)
    with pytest.raises(RecordError, match="expected a JSON object"):
        validate(json.loads(text))
    assert write_record_guarded(path, failed_record())[1]  # the rerun check treats it as no record


def test_leaderboard_skips_non_objects_with_a_warning_naming_each(tmp_path, capsys):
    import importlib.util

    from vpeft.results.render import write_leaderboard

    runs = tmp_path / "runs"
    good = [make_record(dataset="digits", top1=95.0), make_record(method="linear", dataset="digits", top1=90.0)]
    for r in good:
        write_record(record_path(runs, r), r)
    bad = [record_path(runs, make_record(seed=i + 10)) for i in range(len(NON_OBJECTS))]
    bad.append(runs / "notes" / "stray.json")
    for path, text in zip(bad, [*NON_OBJECTS, "null"]):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    with pytest.warns(UserWarning) as caught:
        written = write_leaderboard(runs, tmp_path / "out")
    messages = [str(w.message) for w in caught]
    for path in bad:
        assert any(str(path) in m and "not a JSON object" in m for m in messages), path
    csv = written["leaderboard.csv"].read_text()
    assert "lora" in csv and "linear" in csv

    spec = importlib.util.spec_from_file_location("leaderboard_script", ROOT / "scripts" / "leaderboard.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.warns(UserWarning, match="not a JSON object"):
        assert script.main([str(runs), "--out", str(tmp_path / "out2")]) == 0


def test_bench_readers_skip_non_objects(tmp_path):
    from vpeft.bench.record import iter_bench_records

    (tmp_path / "a.json").write_text("null")
    (tmp_path / "b.json").write_text("[1, 2]")
    with pytest.warns(UserWarning) as caught:
        assert list(iter_bench_records(tmp_path)) == []
    assert sorted(Path(str(w.message).split()[1].rstrip(":")).name for w in caught) == ["a.json", "b.json"]


# -- delta files -----------------------------------------------------------------------------------


@pytest.fixture
def delta_file(tmp_path) -> Path:
    model = vpeft.apply_method(make_vit(), "lora")
    return vpeft.save_delta(model, tmp_path / "d.safetensors")


@pytest.mark.parametrize(
    "kind, content, says",
    [
        ("empty", lambda b: b"", "is empty"),
        ("truncated", lambda b: b[: len(b) // 2], "truncated"),
        ("truncated header", lambda b: b[:12], "truncated"),
        ("garbage", lambda b: bytes(range(64)) + b"not safetensors at all" * 20, "not a readable safetensors"),
        ("json", lambda b: b'{"method": "lora"}', "not a readable safetensors"),
    ],
)
def test_broken_delta_files_raise_a_data_error_naming_the_path(delta_file, kind, content, says):
    broken = delta_file.with_name(f"{kind.replace(' ', '_')}.safetensors")
    broken.write_bytes(content(delta_file.read_bytes()))
    for call in (lambda: vpeft.read_delta(broken), lambda: vpeft.load_delta(make_vit(), broken)):
        with pytest.raises(DataError, match=says) as e:
            call()
        assert str(broken) in str(e.value)


def test_missing_delta_and_broken_metadata(tmp_path, delta_file):
    from safetensors.torch import save_file

    missing = tmp_path / "missing.safetensors"
    with pytest.raises(DataError, match="no delta file at") as e:
        vpeft.load_delta(make_vit(), missing)
    assert isinstance(e.value, VpeftError) and isinstance(e.value, FileNotFoundError) and str(missing) in str(e.value)
    with pytest.raises(DataError, match="a folder"):
        vpeft.read_delta(tmp_path)
    odd = tmp_path / "odd.safetensors"
    save_file({"w": torch.zeros(2)}, odd, metadata={"format": "vpeft.delta/1", "method": "lora", "config": "{bad"})
    with pytest.raises(DataError, match="metadata is broken") as e:
        vpeft.read_delta(odd)
    assert str(odd) in str(e.value)


def test_save_delta_is_atomic_with_the_usual_mode(tmp_path, umask_022):
    model = vpeft.apply_method(make_vit(), "bitfit")
    path = vpeft.save_delta(model, tmp_path / "sub" / "d.safetensors")
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert sorted(p.name for p in path.parent.iterdir()) == ["d.safetensors"]
    os.umask(0o077)
    assert stat.S_IMODE(vpeft.save_delta(model, path).stat().st_mode) == 0o600  # the umask decides
    # the write goes through a temp file: a failure leaves the old file whole and no temp behind
    before = path.read_bytes()
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_bytes(b"half a delta")
        raise RuntimeError("killed mid-write")
    assert path.read_bytes() == before and sorted(p.name for p in path.parent.iterdir()) == ["d.safetensors"]


def tiny_timm(name: str = "vit_tiny_patch16_224") -> torch.nn.Module:
    return timm.create_model(name, pretrained=False, img_size=32, num_classes=3, depth=2)


def test_random_init_delta_names_no_pretrained_tag(tmp_path):
    model = tiny_timm()
    assert model.pretrained_cfg.get("tag")  # timm fills the tag in although nothing was loaded
    assert vpeft.core.backbone_name(model) == "vit_tiny_patch16_224"
    vpeft.apply_method(model, "bitfit")
    _, info = vpeft.read_delta(vpeft.save_delta(model, tmp_path / "random.safetensors"))
    assert info["backbone"] == "vit_tiny_patch16_224" and info["weights"] is None
    mark_weights(model, "random")
    _, info = vpeft.read_delta(vpeft.save_delta(model, tmp_path / "random.safetensors"))
    assert (info["backbone"], info["weights"]) == ("vit_tiny_patch16_224", "random")
    mark_weights(model, "checkpoint:/some/weights.safetensors")  # not timm's tag either
    assert vpeft.core.backbone_name(model) == "vit_tiny_patch16_224"
    mark_weights(model, "timm:timm/vit_tiny_patch16_224.augreg_in21k")
    tag = model.pretrained_cfg["tag"]
    assert vpeft.core.backbone_name(model) == f"vit_tiny_patch16_224.{tag}"
    _, info = vpeft.read_delta(vpeft.save_delta(model, tmp_path / "timm.safetensors"))
    assert info["backbone"] == f"vit_tiny_patch16_224.{tag}"


def test_load_delta_still_checks_the_architecture(tmp_path):
    import warnings

    model = vpeft.apply_method(tiny_timm(), "bitfit")
    path = vpeft.save_delta(model, tmp_path / "d.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vpeft.load_delta(tiny_timm(), path)  # the same architecture: silent
    other = mark_weights(tiny_timm("vit_tiny_patch16_384"), "timm:timm/vit_tiny_patch16_384.augreg_in21k_ft_in1k")
    with pytest.warns(UserWarning, match="trained on vit_tiny_patch16_224, loading onto vit_tiny_patch16_384"):
        vpeft.load_delta(other, path)


def test_git_dirty_means_the_code_not_the_committed_results(tmp_path):
    """A run writing into the committed results/ folder does not make the next record say 'uncommitted changes';
    an edited source file does."""
    import subprocess

    from vpeft.env import git_state

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "r.json").write_text("{}")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    assert git_state(tmp_path)["git_dirty"] is False
    (tmp_path / "results" / "r.json").write_text('{"a": 1}')
    assert git_state(tmp_path)["git_dirty"] is False
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_state(tmp_path)["git_dirty"] is True
