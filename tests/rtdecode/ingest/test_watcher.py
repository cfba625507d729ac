import os
import queue
import time

import pytest

from rtdecode.ingest.watcher import FileWatcher, choose_watch_mode, filesystem_type

MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
40 22 0:35 / /mnt/scanner rw,relatime shared:20 - nfs4 console:/export rw,vers=4.2
41 22 0:36 / /mnt/smb\\040share rw,relatime - cifs //console/rt rw
42 40 8:2 / /mnt/scanner/local rw - xfs /dev/sdb1 rw
43 22 0:40 / /mnt/sshfs rw - fuse.sshfs user@host:/d rw
"""


@pytest.mark.parametrize(
    "path, fs_type, mode",
    [
        ("/home/op/data", "ext4", "inotify"),
        ("/mnt/scanner/run1", "nfs4", "poll"),
        ("/mnt/smb share/x", "cifs", "poll"),
        ("/mnt/scanner/local/x", "xfs", "inotify"),  # the longest mount point wins
        ("/mnt/sshfs", "fuse.sshfs", "poll"),
    ],
)
def test_filesystem_type_and_mode_from_mountinfo(path, fs_type, mode):
    assert filesystem_type(path, MOUNTINFO) == fs_type
    assert choose_watch_mode(path, "auto", MOUNTINFO) == mode
    assert choose_watch_mode(path, "poll", MOUNTINFO) == "poll"


def test_local_temp_folder_uses_inotify(tmp_path):
    assert choose_watch_mode(tmp_path, "auto") == "inotify"


def collect(hints, until, timeout_s=5.0):
    found = []
    deadline = time.monotonic() + timeout_s
    while not until(found) and time.monotonic() < deadline:
        try:
            found.append(hints.get(timeout=0.05))
        except queue.Empty:
            pass
    return found


def test_inotify_reports_closed_moved_and_new_folders(tmp_path):
    hints = queue.Queue()
    (tmp_path / "old.dcm").write_bytes(b"x")
    watcher = FileWatcher(tmp_path, "inotify", hints.put, lambda p: p.name.endswith(".tmp"), rescan_interval_s=60.0)
    existing = watcher.start()
    try:
        assert [f.path.name for f in existing] == ["old.dcm"]
        (tmp_path / "a.dcm").write_bytes(b"abc")
        (tmp_path / "b.tmp").write_bytes(b"abc")
        (tmp_path / "b.tmp").rename(tmp_path / "b.dcm")
        (tmp_path / "series2").mkdir()
        (tmp_path / "series2" / "c.dcm").write_bytes(b"abcd")  # may land before the folder's watch exists
        wanted = {("a.dcm", "close_write"), ("b.dcm", "moved")}

        def complete(found):
            seen = {(h.path.name, h.trigger) for h in found}
            return wanted <= seen and any(name == "c.dcm" for name, _ in seen)

        found = collect(hints, complete)
    finally:
        watcher.stop()
    assert complete(found), found
    assert not any(h.path.name == "b.tmp" for h in found)
    assert all("seen" in h.timestamps for h in found)


def test_polling_reports_new_and_changed_files(tmp_path):
    hints = queue.Queue()
    watcher = FileWatcher(tmp_path, "poll", hints.put, lambda p: False, poll_interval_s=0.05)
    watcher.start()
    staging = tmp_path.parent / f"{tmp_path.name}-staging"
    staging.mkdir()

    def place(data: bytes) -> None:  # written elsewhere, then renamed in: a poll never sees it half-written
        (staging / "a.nii").write_bytes(data)
        os.replace(staging / "a.nii", tmp_path / "a.nii")

    try:
        place(b"1")
        first = collect(hints, lambda f: len(f) >= 1)
        place(b"12345")
        second = collect(hints, lambda f: len(f) >= 1)
        quiet = collect(hints, lambda f: False, timeout_s=0.3)
    finally:
        watcher.stop()
    assert [(h.path.name, h.trigger) for h in first] == [("a.nii", "scan")]
    assert [h.path.name for h in second] == ["a.nii"]  # a changed file is reported again
    assert quiet == []  # an unchanged file is not


def test_a_scan_reports_the_files_it_finds_in_the_order_they_were_written(tmp_path):
    """Two volumes landing within one poll: the one written first is reported first, whatever their names (a
    scanner that wrote volume 8 before volume 7 has reordered them)."""
    hints = queue.Queue()
    watcher = FileWatcher(tmp_path, "poll", hints.put, lambda p: False, poll_interval_s=3600.0)
    watcher.start()  # the first scan happens an hour from now: the test scans by hand
    written_ns = time.time_ns()
    names = [f"vol_{number:03d}.nii" for number in (8, 7, 12, 3, 10)]
    for offset, name in enumerate(names):
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, ns=(written_ns + offset * 1000, written_ns + offset * 1000))
    try:
        assert [hint.path.name for hint in watcher._scan()] == names
    finally:
        watcher.stop()


def test_bad_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="watch mode must be"):
        FileWatcher(tmp_path, "sometimes", print, lambda p: False)
