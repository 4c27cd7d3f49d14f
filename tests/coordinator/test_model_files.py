"""Reading what sizing needs from a model's files, and the cache that reads them off the loop."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import mlx.core as mx
import pytest

from coordinator.errors import SizingError
from coordinator.model_files import (
    ModelFileCache,
    ModelFiles,
    read_model_files,
    safetensors_bytes,
    weight_bytes,
)


def test_weight_bytes_come_from_the_safetensors_header(tmp_path: Path) -> None:
    """Quantized weights with their scales and biases, counted without reading tensors."""
    w = mx.random.normal((256, 512))
    q, scales, biases = mx.quantize(w, group_size=64, bits=4)
    arrays = {
        "layer.weight": q,
        "layer.scales": scales,
        "layer.biases": biases,
        "norm.weight": mx.ones((512,), dtype=mx.bfloat16),
    }
    mx.save_safetensors(str(tmp_path / "model.safetensors"), arrays)
    expected = sum(a.nbytes for a in arrays.values())
    assert safetensors_bytes(tmp_path / "model.safetensors") == expected
    assert weight_bytes(tmp_path) == expected
    assert expected < (tmp_path / "model.safetensors").stat().st_size  # the header is extra


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "too short"),
        (b"\xff" * 8, "not plausible"),
        (b"\x04\x00\x00\x00\x00\x00\x00\x00nope", "not JSON"),
    ],
)
def test_bad_safetensors_files_are_refused(tmp_path: Path, content: bytes, message: str) -> None:
    (tmp_path / "model.safetensors").write_bytes(content)
    with pytest.raises(SizingError, match=message):
        weight_bytes(tmp_path)


def test_a_folder_without_weights_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SizingError, match="no .safetensors weights"):
        weight_bytes(tmp_path)


def test_a_folder_gives_its_weights_and_config(tmp_path: Path) -> None:
    header = json.dumps({"w": {"dtype": "U8", "shape": [7], "data_offsets": [0, 7]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    (tmp_path / "config.json").write_text('{"num_hidden_layers": 2}')
    assert read_model_files(str(tmp_path)) == ModelFiles(7, {"num_hidden_layers": 2})
    with pytest.raises(SizingError, match="neither a model folder nor a Hugging Face id"):
        read_model_files(str(tmp_path / "no" / "such" / "folder"))


async def test_reads_run_off_the_loop_once_per_source_and_wake_the_caller() -> None:
    """The loop keeps running while a read blocks its worker thread; the result is cached."""
    release = threading.Event()
    reads: list[str] = []
    woken = asyncio.Event()

    def slow_reader(source: str) -> ModelFiles | SizingError:
        reads.append(source)
        release.wait(5)
        return ModelFiles(42, {}) if source == "good" else SizingError(f"{source}: bad")

    cache = ModelFileCache(woken.set, slow_reader)
    assert cache.get("good") is None and cache.get("bad") is None  # both reading now
    assert cache.get("good") is None  # asked again while reading: no second read
    await asyncio.sleep(0.05)  # the loop is free meanwhile
    assert not woken.is_set()
    release.set()
    await asyncio.wait_for(cache.settled(), 5)
    assert woken.is_set()
    assert cache.get("good") == ModelFiles(42, {})
    bad = cache.get("bad")
    assert isinstance(bad, SizingError) and str(bad) == "bad: bad"
    assert sorted(reads) == ["bad", "good"]


async def test_an_unexpected_failure_is_a_sizing_error_and_close_cancels_reads() -> None:
    def broken(source: str) -> ModelFiles | SizingError:
        raise RuntimeError("disk on fire")

    cache = ModelFileCache(lambda: None, broken)
    assert cache.get("m") is None
    await asyncio.wait_for(cache.settled(), 5)
    failed = cache.get("m")
    assert isinstance(failed, SizingError) and "disk on fire" in str(failed)

    release = threading.Event()

    def blocked(source: str) -> ModelFiles | SizingError:
        release.wait(5)
        return ModelFiles(0, None)

    stuck = ModelFileCache(lambda: None, blocked)
    assert stuck.get("m") is None
    stuck.close()  # what Reconciler.run does when it ends
    await asyncio.sleep(0)
    assert stuck.get("m") is None  # cancelled, nothing cached: asked again, read again
    release.set()
    await asyncio.wait_for(stuck.settled(), 5)
    assert stuck.get("m") == ModelFiles(0, None)


def test_without_a_running_loop_it_reads_at_once_and_forgets_missing_hub_models() -> None:
    calls: list[str] = []

    def reader(source: str) -> ModelFiles | SizingError:
        calls.append(source)
        return ModelFiles(0, None) if source == "org/model" else ModelFiles(1, {})

    cache = ModelFileCache(lambda: None, reader)
    assert cache.get("org/model") == ModelFiles(0, None)
    assert cache.get("/local") == ModelFiles(1, {})
    cache.forget_missing()  # a hub model not downloaded then may be in the cache by now
    cache.get("org/model")
    cache.get("/local")
    assert calls == ["org/model", "/local", "org/model"]
