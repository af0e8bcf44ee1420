"""Peak resident memory of converting a float32 OpenELM-1_1B-shaped checkpoint (random weights, 4.3 GB) to
bfloat16: ``mlx-openelm convert`` beside ``mlx_lm convert`` on the same input.

The source is generated tensor by tensor (HF names, Apple's config.json, a small tokenizer so that mlx-lm's
converter, which needs one, runs too), each conversion runs in its own subprocess and its peak RSS is read
from ``os.wait4``'s rusage; everything written is deleted at the end. Needs about 9 GB of free disk.

    python benchmarks/convert_memory.py [--preset OpenELM-1_1B] [--workdir /tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the HF checkpoint layout and tokenizer helpers live with the tests

from hf_checkpoint import apple_config  # noqa: E402
from mlx_openelm.convert import expected_tensors  # noqa: E402
from mlx_openelm.convert.writer import ShardWriter, TensorSpec  # noqa: E402
from spm_util import train_spm  # noqa: E402

from mlx_openelm import __version__, preset  # noqa: E402
from mlx_openelm.bench import write_json  # noqa: E402
from mlx_openelm.device import device_info  # noqa: E402
from mlx_openelm.tokenizer_fetch import ensure_tokenizer  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
TARGET_MB = 1500  # issue #3: peak RSS of the 1.1B float32 -> bfloat16 conversion


def write_random_checkpoint(name: str, out: Path) -> int:
    """An HF-format float32 checkpoint of preset ``name`` in ``out``, written one tensor at a time; its bytes."""
    args = preset(name)
    shapes, _ = expected_tensors(args)
    specs = [TensorSpec(n, s, mx.float32) for n, s in shapes.items()]
    out.mkdir(parents=True)
    writer = ShardWriter(out, specs, max_shard_bytes=1 << 40)  # one model.safetensors, as Apple's 1.1B repo
    for i, spec in enumerate(specs):
        if spec.name.endswith("norm.weight"):
            w = mx.ones(spec.shape)
        else:
            std = 4 / args.model_dim**0.5 if "token_embeddings" in spec.name else spec.shape[-1] ** -0.5
            w = mx.random.normal(spec.shape, key=mx.random.key(i)) * std
        writer.write(spec.name, w)
        del w
    writer.close()
    (out / "model.safetensors.index.json").unlink()  # Apple's single-file repos have no index
    (out / "config.json").write_text(json.dumps(apple_config(args.to_dict()), indent=2) + "\n")
    ensure_tokenizer(out, tokenizer=str(train_spm(out.parent / "spm")), allow_rebuild=False)
    return sum(s.nbytes for s in specs)


def measure(cmd: list[str]) -> dict:
    """Run ``cmd``; its peak RSS (MB, from the kernel's rusage for that child alone) and wall time."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = proc.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{output}")
    return {"peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "seconds": round(time.perf_counter() - start, 1)}


def same_tensors(a: Path, b: Path, names: list[str]) -> bool:
    """Whether two converted folders hold identical values for ``names`` (read lazily, one at a time)."""
    def find(folder: Path, name: str) -> mx.array:
        index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
        return mx.load(str(folder / index[name]))[name]

    return all(mx.array_equal(find(a, n), find(b, n)).item() for n in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="OpenELM-1_1B")
    parser.add_argument("--workdir", default=tempfile.gettempdir(), help="where the temporary files go")
    opts = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="convert-memory-", dir=opts.workdir))
    try:
        start = time.perf_counter()
        source_bytes = write_random_checkpoint(opts.preset, work / "src")
        generate_s = time.perf_counter() - start
        ours = measure([sys.executable, "-m", "cli", "convert", str(work / "src"), "-o", str(work / "ours")])
        theirs = measure([sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(work / "src"),
                          "--mlx-path", str(work / "mlx_lm"), "--dtype", "bfloat16"])
        probe = ["transformer.token_embeddings.weight", "transformer.layers.0.attn.qkv_proj.weight",
                 "transformer.norm.weight"]
        result = {
            "benchmark": "convert_memory",
            "preset": opts.preset,
            "source": f"random float32 HF checkpoint, {source_bytes / 1e9:.2f} GB, generated in {generate_s:.0f} s",
            "conversion": "float32 -> bfloat16",
            "ours": {**ours, "command": "mlx-openelm convert SRC -o OUT"},
            "mlx_lm": {**theirs, "command": "python -m mlx_lm convert --hf-path SRC --mlx-path OUT --dtype bfloat16"},
            "outputs_identical": same_tensors(work / "ours", work / "mlx_lm", probe),
            "target_peak_rss_mb": TARGET_MB,
            "pass": ours["peak_rss_mb"] < TARGET_MB,
            "mlx_openelm_version": __version__,
            "device": device_info(),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    path = write_json(RESULTS / f"convert_memory_{opts.preset}.json", result)
    print(json.dumps({k: result[k] for k in ("ours", "mlx_lm", "outputs_identical", "pass")}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
