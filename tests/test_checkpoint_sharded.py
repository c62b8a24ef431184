"""Sharded checkpoint directories (nmt_moe/sharded_checkpoint.py) as the consumers read them: `translate`,
`export` and `average` give what they give for one-file checkpoints, read one tensor at a time (peak memory
measured in a subprocess), refuse unsafe metadata, and a save that dies midway leaves the previous
checkpoint usable. The directories here are written by one process; tests/parallel/test_checkpoint.py
writes them from 4 ranks."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers.tiny_models import tiny_checkpoint, tiny_model, tiny_tokenizer

import nmt_moe.sharded_checkpoint as sharded
from nmt_moe.averaging import average_checkpoints
from nmt_moe.checkpoint import FORMAT_VERSION, WEIGHTS_FILE, ModelLoadError, export_bundle, load_model
from nmt_moe.cli.average import main as average_main
from nmt_moe.data.tokenizer import Tokenizer
from nmt_moe.models import Seq2Seq, Seq2SeqConfig
from nmt_moe.moe import MoEConfig


def write_sharded(
    path: Path, model: Seq2Seq, tokenizer: Tokenizer, step: int = 0, moments: bool = False
) -> None:
    """What ExpertParallelStrategy writes, from one process: weights (and Adam-like moments) plus meta.pt."""
    tensors = {f"state_dict/model.{key}": value for key, value in model.state_dict().items()}
    if moments:
        for name, param in model.named_parameters():
            tensors[f"optimizer_0/model.{name}/exp_avg"] = torch.randn_like(param)
            tensors[f"optimizer_0/model.{name}/exp_avg_sq"] = torch.rand_like(param)
    meta = {
        "nmt_moe": {
            "version": FORMAT_VERSION,
            "model_config": model.config,
            "tokenizer": tokenizer.to_bytes(),
        },
        "global_step": step,
        "pytorch-lightning_version": "2.6.6",
    }
    sharded.save_sharded(path, tensors, meta, is_writer=True, barrier=lambda: None)


def test_sharded_directory_translates_exports_and_averages_like_files(tmp_path: Path) -> None:
    tokenizer = tiny_tokenizer()
    files, dirs = [], []
    for seed in range(3):
        model, _ = tiny_checkpoint(tmp_path / f"step={seed}.ckpt", seed=seed, global_step=seed)
        files.append(tmp_path / f"step={seed}.ckpt")
        dirs.append(tmp_path / "sharded" / f"step={seed}.ckpt")
        write_sharded(dirs[-1], model, tokenizer, step=seed)
    loaded, _ = load_model(dirs[0])
    from_file, _ = load_model(files[0])
    for key, value in from_file.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key

    export_bundle(dirs[0], tmp_path / "bundle")
    exported = torch.load(tmp_path / "bundle" / WEIGHTS_FILE, weights_only=True)
    assert exported.keys() == from_file.state_dict().keys()
    assert all(torch.equal(exported[k], v) for k, v in from_file.state_dict().items())

    by_dir, by_file = average_checkpoints(dirs), average_checkpoints(files)
    assert by_dir["global_step"] == by_file["global_step"] == 2
    assert by_dir["state_dict"].keys() == by_file["state_dict"].keys()
    for key, value in by_file["state_dict"].items():
        assert torch.equal(by_dir["state_dict"][key], value), key
    out = tmp_path / "avg.ckpt"
    assert average_main(["--last", "2", str(tmp_path / "sharded"), "-o", str(out)]) == 0
    load_model(out)
    with pytest.raises(ModelLoadError, match="sharded checkpoint directories with .ckpt files"):
        average_checkpoints([dirs[0], files[1]])


def test_a_save_that_dies_midway_leaves_the_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    tokenizer = tiny_tokenizer()
    path = tmp_path / "last.ckpt"
    first = tiny_model(tokenizer.vocab_size, seed=1)
    write_sharded(path, first, tokenizer, step=1)

    save = sharded.dcp.save

    def dies(*args: object, **kwargs: object) -> None:
        save(*args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(sharded.dcp, "save", dies)  # the shards are written, meta.pt is not
    with pytest.raises(OSError, match="disk full"):
        write_sharded(path, tiny_model(tokenizer.vocab_size, seed=2), tokenizer, step=2)
    monkeypatch.undo()
    partial = tmp_path / ".last.ckpt.partial"
    assert (partial / sharded.DCP_METADATA).is_file() and not sharded.is_sharded_checkpoint(partial)
    assert sharded.read_meta(path)["global_step"] == 1
    model, _ = load_model(path)
    assert all(torch.equal(v, first.state_dict()[k]) for k, v in model.state_dict().items())
    write_sharded(path, tiny_model(tokenizer.vocab_size, seed=3), tokenizer, step=3)  # a later save succeeds
    assert sharded.read_meta(path)["global_step"] == 3 and not partial.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


class _Evil:
    def __reduce__(self) -> tuple:
        return (print, ("pwned",))


def test_unsafe_metadata_and_non_tensor_items_are_refused(tmp_path: Path, capsys) -> None:
    tokenizer = tiny_tokenizer()
    path = tmp_path / "c.ckpt"
    write_sharded(path, tiny_model(tokenizer.vocab_size), tokenizer)
    good = (path / sharded.DCP_METADATA).read_bytes()
    (path / sharded.DCP_METADATA).write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(ModelLoadError, match="builtins.print"):
        load_model(path)
    assert "pwned" not in capsys.readouterr().out
    (path / sharded.DCP_METADATA).write_bytes(good)
    load_model(path)
    other = tmp_path / "bytes.ckpt"  # a non-tensor item: DCP would torch.load it with weights_only=False
    sharded.save_sharded(other, {"state_dict/x": torch.ones(2), "note": {"a": 1}}, {}, True, lambda: None)
    with pytest.raises(sharded.ShardedCheckpointError, match="non-tensor item"):
        sharded.tensor_index(other)


PEAK_SCRIPT = """
import json, sys
import torch
from nmt_moe.checkpoint import export_bundle
from nmt_moe.models import Seq2Seq, Seq2SeqConfig
from nmt_moe.moe import MoEConfig

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))

with torch.device("meta"):  # the first model built on the meta device imports ~800 modules (~70 MiB),
    Seq2Seq(Seq2SeqConfig(vocab_size=8, embed_dim=4, hidden_size=4, moe=MoEConfig(num_experts=2, k=1)))
with open("/proc/self/clear_refs", "w") as f:  # a fixed cost of any size: imported here, not counted
    f.write("5")  # reset the peak (VmHWM) to the current resident size: the imports' peak is gone
before = status("VmRSS:")
export_bundle(sys.argv[1], sys.argv[2])
print(json.dumps({"peak_extra_bytes": status("VmHWM:") - before}))
"""


def export_peak(checkpoint: Path, out: Path) -> int:
    """Bytes of memory `export_bundle` adds at its peak: a fresh process's high-water mark (VmHWM, reset
    after the imports) minus its resident size before."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(PEAK_SCRIPT), str(checkpoint), str(out)],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    return json.loads(result.stdout.splitlines()[-1])["peak_extra_bytes"]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-memory reset")
def test_export_of_a_sharded_checkpoint_peaks_near_the_model_size(tmp_path: Path) -> None:
    """64 MiB of weights (largest tensor 16 MiB) with Adam moments (192 MiB of tensors): exporting the
    sharded directory adds about the model plus two copies of the largest tensor (read in place, chunk by
    chunk; measured +98 MiB); the one-file checkpoint of the same run, loaded whole and then built into a
    model, adds about three times the model (+193 MiB). Both measured in this run."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = Seq2Seq(Seq2SeqConfig(
        vocab_size=tokenizer.vocab_size, embed_dim=16, hidden_size=32, encoder_layers=2, decoder_layers=2,
        moe=MoEConfig(num_experts=64, k=2, d_hidden=2048),
    ))  # fmt: skip
    weights = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    write_sharded(tmp_path / "sharded.ckpt", model, tokenizer, moments=True)
    moments = {
        i: {"exp_avg": torch.randn_like(p), "exp_avg_sq": torch.rand_like(p)}
        for i, p in enumerate(model.parameters())
    }
    tiny = {"state": moments, "param_groups": [{"params": list(moments)}]}
    from nmt_moe.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "file.ckpt", model, tokenizer, optimizer_states=[tiny])
    del moments, tiny
    sharded_peak = export_peak(tmp_path / "sharded.ckpt", tmp_path / "a")
    file_peak = export_peak(tmp_path / "file.ckpt", tmp_path / "b")
    print(f"weights {weights / 2**20:.0f} MiB: export peak +{sharded_peak / 2**20:.0f} MiB from the sharded "
          f"directory, +{file_peak / 2**20:.0f} MiB from the one-file checkpoint")  # fmt: skip
    largest = max(v.numel() * v.element_size() for v in model.state_dict().values())
    # The model plus DCP's transient per chunk (the chunk's bytes and the tensor read from them).
    assert sharded_peak < weights + 3 * largest
    assert file_peak > 2.5 * weights  # the measurement can tell the two apart
