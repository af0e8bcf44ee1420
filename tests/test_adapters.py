"""Fine-tuned models on our fast path: a LoRA adapter trained by ``mlx_lm.lora`` (2 steps) on one of our converted
folders is fused at load by ``--adapter-path``, and a folder written by ``mlx_lm.fuse`` loads with ours."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from mlx_openelm import generate, load

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def adapted(trained_checkpoint, tmp_path_factory):
    from mlx_openelm.convert import convert

    root = tmp_path_factory.mktemp("lora")
    folder = convert(trained_checkpoint.path, root / "model", dtype="float32").path
    data = root / "data"
    data.mkdir()
    for split in ("train", "valid"):
        lines = [json.dumps({"text": f"Hello there {i}."}) + "\n" for i in range(4)]
        (data / f"{split}.jsonl").write_text("".join(lines))
    subprocess.run([str(BIN / "mlx_lm.lora"), "--model", str(folder), "--train", "--data", str(data), "--iters", "2",
                    "--batch-size", "1", "--num-layers", "2", "--adapter-path", str(root / "adapter"),
                    "--learning-rate", "5e-2", "--steps-per-eval", "100", "--val-batches", "1"],
                   check=True, capture_output=True, timeout=300)
    return folder, root / "adapter", trained_checkpoint


def test_the_fused_adapter_gives_mlx_lms_logits(adapted):
    import mlx_lm

    folder, adapter, t = adapted
    ours, tok = load(folder, adapter_path=adapter)
    theirs, _ = mlx_lm.load(str(folder), adapter_path=str(adapter))  # LoRA layers, unfused
    base, _ = load(folder)
    ids = mx.array([t.prompt_ids])
    assert mx.abs(ours(ids) - theirs(ids)).max().item() < 1e-4
    assert mx.abs(ours(ids) - base(ids)).max().item() > 1e-2  # the adapter changed the model
    assert not any("lora" in name for name, _ in ours.named_modules())  # fused: plain layers for the fast step


def test_generate_applies_the_adapter(adapted):
    folder, adapter, t = adapted
    ours, tok = load(folder, adapter_path=adapter)
    p = subprocess.run([str(BIN / "mlx-openelm"), "generate", "-m", str(folder), "--adapter-path", str(adapter), "-p",
                        t.prompt, "-n", "12", "--json"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["text"] == generate(ours, tok, t.prompt, max_tokens=12)


def test_a_folder_fused_by_mlx_lm_loads_with_ours(adapted, tmp_path):
    folder, adapter, t = adapted
    fused = tmp_path / "fused"
    subprocess.run([str(BIN / "mlx_lm.fuse"), "--model", str(folder), "--adapter-path", str(adapter), "--save-path",
                    str(fused)], check=True, capture_output=True, timeout=300)
    theirs, _ = load(fused)
    ours, _ = load(folder, adapter_path=adapter)
    ids = mx.array([t.prompt_ids])
    assert mx.abs(theirs(ids) - ours(ids)).max().item() < 1e-4
