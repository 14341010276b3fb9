"""save_checkpoint when Ray Train's copy into storage fails: the partial directory is deleted by rank 0 (the one
whose name Ray Train uses), and a full disk is one OSError naming the storage path and the fixes; other errors pass
through unchanged. (test_faults.py fills a real tmpfs.)"""

import errno
from pathlib import Path

import pytest

from towerlab.train.checkpoint import no_space, save_checkpoint
from towerlab.train.recipe import load_recipe


class Engine:  # DeepSpeed's engine writes the shards; only what happens around the copy is looked at here
    def save_checkpoint(self, path, tag, client_state):
        Path(path, tag).mkdir()


class Storage:  # the part of Ray Train's StorageContext save_checkpoint uses
    def __init__(self, root):
        self.root, self.deleted = root, []
        self.storage_filesystem = self

    def build_checkpoint_path_from_name(self, name):
        return f"{self.root}/{name}"

    def delete_dir(self, path):
        self.deleted.append(path)


def _full(ckpt, name):
    raise OSError("Error writing bytes to file. Detail: [errno 28] No space left on device")


@pytest.mark.parametrize("rank", [0, 1])
def test_full_disk_is_one_line_and_no_partial_directory(tmp_path, rank):
    recipe = load_recipe(None, ["train.storage_path=/mnt/small", "train.keep_checkpoints=3"])
    storage = Storage("/mnt/small/run")
    with pytest.raises(OSError) as e:
        save_checkpoint(Engine(), recipe, rank, {}, _full, storage=storage)
    assert e.value.errno == errno.ENOSPC
    message = str(e.value)
    assert "no space left on device writing a checkpoint to /mnt/small/run" in message
    for fix in ("free space", "train.storage_path", "train.keep_checkpoints=3"):
        assert fix in message
    assert len(storage.deleted) == (1 if rank == 0 else 0)
    if rank == 0:
        assert storage.deleted[0].startswith("/mnt/small/run/checkpoint_")


def test_other_errors_pass_through_and_still_clean_up():
    recipe = load_recipe(None, [])
    storage = Storage("/s/run")

    def broken(ckpt, name):
        raise PermissionError(errno.EACCES, "Permission denied")

    with pytest.raises(PermissionError):
        save_checkpoint(Engine(), recipe, 0, {}, broken, storage=storage)
    assert len(storage.deleted) == 1


def test_a_copy_that_works_deletes_nothing():
    names, storage = [], Storage("/s/run")
    save_checkpoint(Engine(), load_recipe(None, []), 0, {}, lambda ckpt, name: names.append(name), storage=storage)
    assert storage.deleted == [] and names[0].startswith("checkpoint_")


def test_no_space():
    assert no_space(OSError(errno.ENOSPC, "x"))
    assert no_space(OSError("IOError: [errno 28] No space left on device"))
    assert not no_space(OSError(errno.EACCES, "Permission denied"))
