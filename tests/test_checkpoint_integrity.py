"""Checkpoints prove their integrity: a manifest of every file (size, SHA-256) written before COMPLETE;
``--resume auto`` verifies and falls back past a truncated or corrupted checkpoint, naming the bad file; an
explicitly named damaged checkpoint is an error; a checkpoint without a manifest resumes with a warning;
``train.keep_checkpoints`` keeps the newest K. In process, one rank (the ranks' shared hashing is the same code
with a strided share; tests/test_train_deepspeed.py resumes under 2 ranks)."""
import hashlib
import json
import os

import pytest

from lct_fast import checkpoint as ckpt
from lct_fast.config import load_config
from lct_fast.trainer import Trainer

SMALL = ["model.width=32", "train.global_batch=8", "train.log_interval=8", "optim.warmup_samples=0",
         "data.shuffle_buffer=64", "train.ckpt_interval=8", "train.sample_interval=0", "train.total_samples=24"]


def trained(tmp_path, *overrides):
    tr = Trainer(load_config("tiny", SMALL + list(overrides)), str(tmp_path / "run"))
    tr.run()
    return tr, os.path.join(tr.run_dir, "checkpoints")


def test_manifest_lists_every_file_with_its_checksum(tmp_path):
    _, ck = trained(tmp_path)
    tag = ckpt.tag_for(24)
    with open(os.path.join(ck, tag, ckpt.MANIFEST)) as f:
        man = json.load(f)
    on_disk = sorted(n for n in os.listdir(os.path.join(ck, tag)) if n not in (ckpt.MANIFEST, "COMPLETE"))
    assert sorted(man["files"]) == on_disk and len(on_disk) >= 2  # DeepSpeed's file(s) + our client state
    for name, entry in man["files"].items():  # hashlib directly, not the module's reader
        with open(os.path.join(ck, tag, name), "rb") as f:
            data = f.read()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert ckpt.verify(ck, tag) == []


def _damage(path: str, how: str) -> None:
    if how == "truncated":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    else:  # one flipped byte, same size
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) // 2)
            b = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([b[0] ^ 0xFF]))


@pytest.mark.parametrize("how", ["truncated", "corrupted"])
def test_resume_auto_falls_back_past_a_damaged_checkpoint(tmp_path, how, capsys):
    _, ck = trained(tmp_path)
    newest = ckpt.tag_for(24)
    victim = sorted(n for n in os.listdir(os.path.join(ck, newest)) if n.endswith(".pt"))[0]
    _damage(os.path.join(ck, newest, victim), how)
    problems = ckpt.verify(ck, newest)
    assert len(problems) == 1 and victim in problems[0]
    assert ("truncated" if how == "truncated" else "corrupted") in problems[0]

    again = Trainer(load_config("tiny", SMALL), str(tmp_path / "run"), resume="auto")
    err = capsys.readouterr().err
    assert again.samples == 16, "the previous complete checkpoint"
    assert f"{newest} is damaged" in err and victim in err
    # naming the damaged tag explicitly is an error that names the file, not a silent fallback
    with pytest.raises(FileNotFoundError, match=victim):
        Trainer(load_config("tiny", SMALL), str(tmp_path / "run"), resume=newest)


def test_checkpoint_without_manifest_resumes_with_a_warning(tmp_path, capsys):
    _, ck = trained(tmp_path)
    newest = ckpt.tag_for(24)
    os.remove(os.path.join(ck, newest, ckpt.MANIFEST))
    again = Trainer(load_config("tiny", SMALL), str(tmp_path / "run"), resume="auto")
    assert again.samples == 24
    assert f"{newest} has no {ckpt.MANIFEST}" in capsys.readouterr().err


def test_keep_checkpoints_keeps_the_newest(tmp_path):
    _, ck = trained(tmp_path, "train.keep_checkpoints=2")
    tags = sorted(t for t in os.listdir(ck) if t.startswith("samples-"))
    assert tags == [ckpt.tag_for(16), ckpt.tag_for(24)]
    assert open(os.path.join(ck, "latest")).read().strip() == ckpt.tag_for(24)
    _, ck_all = trained(tmp_path / "all")
    assert len([t for t in os.listdir(ck_all) if t.startswith("samples-")]) == 3


def test_prune_removes_crash_leftovers_but_never_the_newest(tmp_path):
    ck = tmp_path / "checkpoints"
    for s, complete in ((8, True), (16, False), (24, True), (32, False)):
        d = ck / ckpt.tag_for(s)
        d.mkdir(parents=True)
        if complete:
            (d / "COMPLETE").write_text(f"{s}\n")
    (ck / "latest").write_text(ckpt.tag_for(24) + "\n")
    assert ckpt.prune(str(ck), 1) == [ckpt.tag_for(8), ckpt.tag_for(16)]
    # 32 is newer than the newest complete tag: possibly a save in progress, left alone
    assert sorted(os.listdir(ck)) == ["latest", ckpt.tag_for(24), ckpt.tag_for(32)]


def test_collective_timeout_is_a_config_key(tmp_path, monkeypatch):
    """train.collective_timeout_s reaches init_distributed, which bounds every process group with it (ZeRO's own
    groups included: torch's default for new groups is changed); in a fresh process, since this one has a group."""
    import lct_fast.trainer as trainer_mod

    seen = {}
    real = trainer_mod.init_distributed

    def spy(timeout_s=600.0):
        seen["timeout_s"] = timeout_s
        return real(timeout_s=timeout_s)

    monkeypatch.setattr(trainer_mod, "init_distributed", spy)
    Trainer(load_config("tiny", SMALL + ["train.collective_timeout_s=42"]), str(tmp_path / "run"))
    assert seen["timeout_s"] == 42.0
    code = ("import datetime, torch.distributed as dist, torch.distributed.distributed_c10d as c\n"
            "from lct_fast.distributed import init_distributed\n"
            "init_distributed(timeout_s=42)\n"
            "g = dist.new_group([0])\n"
            "print(c._get_default_timeout('gloo').total_seconds(), c._get_default_timeout('nccl').total_seconds())\n")
    import subprocess
    import sys

    env = dict(os.environ, DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        env.pop(k, None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["42.0", "42.0"]


def test_epoch_mode_resplit_refuses_several_workers(tmp_path):
    """One-epoch mode re-splits an epoch over another world size by replaying the old ranks' streams, which is
    defined for one data worker per rank: several workers now, or in the run that wrote the checkpoint, are a
    clear error naming the setting (here the second rank's client state is a copy, standing in for a 2-rank
    save). The re-split itself: tests/test_reshard.py and tests/test_data_loader.py."""
    import shutil

    from lct_fast.validate import UserError

    _, ck = trained(tmp_path, "data.resample=false", "data.num_workers=2")
    newest = ckpt.tag_for(24)
    shutil.copy(os.path.join(ck, newest, "client-rank00000.pt"), os.path.join(ck, newest, "client-rank00001.pt"))
    man_path = os.path.join(ck, newest, ckpt.MANIFEST)
    with open(man_path) as f:
        man = json.load(f)
    man["world_size"] = 2
    with open(man_path, "w") as f:
        json.dump(man, f)
    with pytest.raises(UserError, match="written by 2 ranks and this run has 1.*needs data.num_workers <= 1"):
        Trainer(load_config("tiny", SMALL + ["data.resample=false", "data.num_workers=2"]), str(tmp_path / "run"),
                resume="auto")
    with pytest.raises(UserError, match="written with data.num_workers=2.*resume on 2 ranks"):
        Trainer(load_config("tiny", SMALL + ["data.resample=false", "data.num_workers=0"]), str(tmp_path / "run"),
                resume="auto")


def test_a_save_into_an_existing_tag_leaves_none_of_its_old_files(tmp_path):
    """A run that fell back past a tag (here: its COMPLETE marker lost) and saves the same samples seen again
    replaces the whole folder: a stale shard of another world size cannot mix into the new checkpoint."""
    _, ck = trained(tmp_path)
    newest = ckpt.tag_for(24)
    stale = os.path.join(ck, newest, "zero_pp_rank_3_mp_rank_00_optim_states.pt")
    with open(stale, "wb") as f:
        f.write(b"from a 4-rank save")
    os.remove(os.path.join(ck, newest, "COMPLETE"))
    again = Trainer(load_config("tiny", SMALL), str(tmp_path / "run"), resume="auto")
    assert again.samples == 16
    again.run()
    assert not os.path.exists(stale)
    assert ckpt.is_complete(ck, newest) and ckpt.verify(ck, newest) == []
    assert ckpt.saved_world_size(ck, newest) == 1
