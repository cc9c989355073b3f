"""Hugging Face checkpoints in and out: config.json + safetensors (single file or sharded with an index).

Loading builds the model on the meta device (no memory, no init) and then assigns the checkpoint's tensors shard by
shard, cast to the requested dtype and moved to the device, so the host holds about one shard beyond the model.
HF names are ours with a "model." prefix ("model.layers.0.mlp.up_proj.weight" <-> "layers.0.mlp.up_proj.weight");
"lm_head.weight" is absent when the head is tied to the embedding.

Saving writes the same layout transformers and vLLM read, into a temporary directory next to the target that is
renamed into place only when complete: a crash leaves the previous checkpoint or the new one, never half of one.
What a checkpoint holds beyond the network (`SourceExtras`: the source's generation_config.json and its config.json
keys ModelConfig does not model, such as the bos/eos ids) is read from the source once and written into every
checkpoint saved from it, so transformers and vLLM stop and sample as they would with the source model.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sqlr1.hub import resolve_checkpoint
from sqlr1.model import ModelConfig, Qwen2

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
               "GIB": 2**30, "TIB": 2**40}


# What transformers' Qwen2Config assumes for a key config.json leaves out (our own defaults are Qwen2.5-0.5B's).
HF_QWEN2_DEFAULTS = dict(
    vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32, num_attention_heads=32,
    max_position_embeddings=32768, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
)


def config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    """Build from a Hugging Face Qwen2 config dict; reject features this model does not implement."""
    archs = hf.get("architectures") or []
    if hf.get("model_type") != "qwen2" or (archs and "Qwen2ForCausalLM" not in archs):
        raise ValueError(
            f"{source}: model_type={hf.get('model_type')!r}, architectures={archs}; sqlr1 implements only "
            "Qwen2 / Qwen2.5 (model_type 'qwen2', Qwen2ForCausalLM)"
        )
    if hf.get("use_sliding_window", False):
        raise ValueError(
            f"{source}: use_sliding_window=true is not supported (no Qwen2.5 release enables it); "
            "set it to false"
        )
    for key in ("rope_scaling", "rope_parameters"):  # transformers < 5 / >= 5 spelling
        scaling = hf.get(key)
        kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else scaling
        if kind not in (None, "default"):
            raise ValueError(
                f"{source}: {key}={scaling} is not supported yet (only the default RoPE; YaRN may come "
                f"later); remove the scaling to use the native context length"
            )
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act={hf['hidden_act']!r} is not supported (Qwen2 uses 'silu')")
    known = {f.name for f in fields(ModelConfig)}
    kwargs = {**HF_QWEN2_DEFAULTS, **{k: v for k, v in hf.items() if k in known and v is not None}}
    if "rope_theta" not in hf and isinstance(hf.get("rope_parameters"), dict):
        kwargs["rope_theta"] = hf["rope_parameters"].get("rope_theta", HF_QWEN2_DEFAULTS["rope_theta"])
    if hf.get("num_key_value_heads") is None:  # transformers: no GQA unless stated
        kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
    for name, value in kwargs.items():  # a string here would fail far from config.json
        numbers = (int, float) if name in ("rope_theta", "rms_norm_eps") else (int,)
        if isinstance(value, bool) != (name == "tie_word_embeddings") or not isinstance(value, numbers):
            raise ValueError(f"{source}: {name}={value!r} is not a valid value for {name}")
    try:
        return ModelConfig(**kwargs)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None

def config_to_hf(config: ModelConfig) -> dict:
    """The `config.json` contents transformers and vLLM expect for Qwen2ForCausalLM."""
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        **asdict(config),
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": config.num_hidden_layers,
        "rope_scaling": None,
        "use_cache": True,
        "initializer_range": 0.02,
    }


def _hf_name(name: str) -> str:
    return name if name == "lm_head.weight" else "model." + name


def _our_name(hf_name: str) -> str:
    return hf_name.removeprefix("model.")


def _expected_shapes(model: Qwen2) -> dict[str, torch.Size]:
    """Our parameter names and shapes that a checkpoint must provide (the tied head is the embedding)."""
    shapes = {name: p.shape for name, p in model.named_parameters(remove_duplicate=False)}
    if model.config.tie_word_embeddings:
        del shapes["lm_head.weight"]
    return shapes


def read_json(path: Path) -> dict:
    """A JSON object from `path`, or a ValueError that names the file."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); re-download or rewrite the file") from None
    if not isinstance(content, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(content).__name__}")
    return content


def _weight_files(d: Path) -> tuple[list[Path], dict[str, str] | None, Path]:
    """(shard files, weight_map from the index or None, the file that lists the weights)."""
    index = d / INDEX_FILE
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise ValueError(f"{index}: needs a \"weight_map\" object {{tensor name: shard file}}")
        return [d / f for f in dict.fromkeys(weight_map.values())], weight_map, index
    if (d / SINGLE_FILE).is_file():
        return [d / SINGLE_FILE], None, d / SINGLE_FILE
    bins = " (found PyTorch .bin weights: convert them to safetensors)" if any(d.glob("*.bin")) else ""
    raise FileNotFoundError(f"{d}: no weights found; looked for {INDEX_FILE} and {SINGLE_FILE}{bins}")


def _check_names(names, expected: dict[str, torch.Size], tied: bool, source: Path, hint: str = "") -> None:
    for hf_name in names:
        if _our_name(hf_name) not in expected and not (tied and hf_name == "lm_head.weight"):
            raise ValueError(f"{source}: unexpected tensor {hf_name!r} (not a parameter of Qwen2ForCausalLM){hint}")


def load_model(path_or_repo_id: str | os.PathLike, dtype: torch.dtype = torch.bfloat16, device="cpu") -> Qwen2:
    """A Qwen2 model from a local HF checkpoint directory or Hub repo id, in eval mode, weights in `dtype`."""
    d = resolve_checkpoint(path_or_repo_id)
    config_file = d / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: a checkpoint directory needs config.json")
    hf = read_json(config_file)
    config = config_from_hf(hf, source=str(config_file))
    assumed = [k for k in HF_QWEN2_DEFAULTS if hf.get(k) is None]  # a weight that does not fit may be their fault
    hint = (f" ({config_file} has no {', '.join(assumed)}: transformers' defaults "
            f"{', '.join(f'{k}={HF_QWEN2_DEFAULTS[k]}' for k in assumed)} were assumed; add the model's values)"
            if assumed else "")
    files, weight_map, listing = _weight_files(d)
    with torch.device("meta"):
        model = Qwen2(config)
    expected = _expected_shapes(model)
    tied = config.tie_word_embeddings
    if weight_map is not None:  # fail before reading gigabytes
        _check_names(weight_map, expected, tied, listing, hint)
        for name in expected:
            if _hf_name(name) not in weight_map:
                raise ValueError(f"{listing}: weight {_hf_name(name)!r} is missing from the weight_map{hint}")
    loaded: set[str] = set()
    stored_head = None  # lm_head.weight stored by a tied checkpoint: must equal the embedding
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"{file} is listed in {listing} but does not exist")
        shard = {}
        try:
            handle = safe_open(file, framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error type for a truncated or foreign file
            raise ValueError(f"{file}: not a readable safetensors file ({e}); re-download it") from None
        with handle as f:
            _check_names(f.keys(), expected, tied, file, hint)
            for hf_name in f.keys():
                name = _our_name(hf_name)
                if name not in expected:  # a tied checkpoint that also stores lm_head.weight
                    stored_head = (file, f.get_tensor(hf_name))
                    continue
                t = f.get_slice(hf_name)
                shape = torch.Size(t.get_shape())
                if shape != expected[name]:
                    raise ValueError(f"{file}: {hf_name!r} has shape {tuple(shape)}, config.json implies "
                                     f"{tuple(expected[name])}{hint}")
                # copy=True: the model owns its memory (get_tensor may map the file, which could change under us)
                shard[name] = f.get_tensor(hf_name).to(device=device, dtype=dtype, copy=True)
        model.load_state_dict(shard, strict=False, assign=True)
        loaded |= shard.keys()
        del shard
    for name in expected:
        if name not in loaded:
            where = weight_map.get(_hf_name(name)) if weight_map else SINGLE_FILE
            raise ValueError(f"{d / where}: weight {_hf_name(name)!r} is missing{hint}")
    if tied:  # assign=True replaced the embedding Parameter; point the head at the new one
        model.lm_head.weight = model.embed_tokens.weight
        if stored_head is not None and not torch.equal(stored_head[1].to(device, dtype), model.embed_tokens.weight):
            raise ValueError(f"{stored_head[0]}: lm_head.weight differs from the embedding but config.json says "
                             "tie_word_embeddings=true; set it to false to load the head as stored")
    for name, p in model.named_parameters():
        if p.is_meta:
            raise ValueError(f"{d}: parameter {name!r} was not loaded (still on the meta device)")
    return model.eval()


def check_vocab(tokenizer_size: int, model: Qwen2, source: str | os.PathLike) -> None:
    """Every token id needs an embedding row: tokenizer ids 0..n-1 with n <= config.vocab_size.

    Qwen2.5 has fewer ids than rows (151,665 for 152,064: padding rows, never sampled); more ids than rows would
    index past the embedding at the first such token, deep in training or sampling. train.py and sample.py call
    this once both are loaded from `source`.
    """
    rows = model.config.vocab_size
    if tokenizer_size > rows:
        raise ValueError(f"{source}: tokenizer.json has {tokenizer_size} token ids but the model's embedding has only "
                         f"{rows} rows (config.json vocab_size): use the tokenizer the model was trained with")


# config.json keys that describe the network: written from the ModelConfig and the dtype being saved, never carried
# over from a source (rope_parameters / layer_types are transformers 5's spellings of rope_theta / full attention).
NETWORK_KEYS = frozenset(config_to_hf(ModelConfig())) | {"torch_dtype", "dtype", "rope_parameters", "layer_types"}


@dataclass
class SourceExtras:
    """What a checkpoint keeps of the checkpoint its weights came from, beyond the weights and the ModelConfig.

    `config`: the source config.json's keys outside NETWORK_KEYS (bos/eos/pad ids, transformers_version, ...),
    verbatim; `generation_config`: its generation_config.json (Qwen2.5-Instruct: eos [<|im_end|>, <|endoftext|>] and
    its sampling defaults), None when it has none.
    """

    config: dict
    generation_config: dict | None


def source_extras(path_or_repo_id: str | os.PathLike) -> SourceExtras:
    """The `SourceExtras` of a local HF checkpoint directory or Hub repo id (read once, when training starts)."""
    d = resolve_checkpoint(path_or_repo_id)
    config_file, generation_file = d / "config.json", d / "generation_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: a checkpoint directory needs config.json")
    extra = {k: v for k, v in read_json(config_file).items() if k not in NETWORK_KEYS}
    return SourceExtras(extra, read_json(generation_file) if generation_file.is_file() else None)


def default_generation_config(tokenizer) -> dict:
    """generation_config.json for a model whose source has none: stop at the tokenizer's stop ids, pad with its pad."""
    return {"eos_token_id": list(tokenizer.eos_ids), "pad_token_id": tokenizer.pad_id}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like "5GB" (10^9) / "500MiB" (2^20), as transformers' max_shard_size."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", size.upper())
    if m is None or float(m.group(1)) <= 0:
        raise ValueError(f"max_shard_size={size!r}: expected bytes as an int or a string like '5GB' or '500MiB'")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2) or ""])


def _plain_tensor(t: torch.Tensor) -> torch.Tensor:
    """A CPU tensor safetensors can write: contiguous and owning exactly its storage (views and ties get cloned)."""
    t = t.detach().to("cpu")
    if not t.is_contiguous() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.contiguous().clone()
    return t


def _shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Greedy packing of tensors, in order, into shards of at most max_bytes (a larger tensor gets its own)."""
    shards, current, used = [], [], 0
    for name, nbytes in sizes.items():
        if current and used + nbytes > max_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += nbytes
    return shards + [current]


def _write_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file(tensors, str(path), metadata={"format": "pt"})


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n")


def _fsync_tree(d: Path) -> None:
    for p in d.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(d)


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_state_dict(
    state_dict: dict[str, torch.Tensor],
    config: ModelConfig,
    out_dir: str | os.PathLike,
    max_shard_size: int | str = "5GB",
    generation_config: dict | None = None,
    tokenizer=None,
    source: SourceExtras | None = None,
    stream: Iterator[tuple[str, torch.Tensor]] | None = None,
) -> Path:
    """Write a full state dict (our names, as `Qwen2.state_dict()` gives) as an HF checkpoint directory, atomically.

    Writes config.json (`source.config` verbatim, the ModelConfig's keys over it), model.safetensors or
    model-0000i-of-0000N.safetensors + model.safetensors.index.json, the tokenizer's files when a tokenizer is given
    (`tokenizer.save(dir)`), and generation_config.json: `generation_config`, else the source's, else one built from
    the tokenizer's stop and pad ids (none without a tokenizer). All tensors must share one dtype, recorded as
    config.json's "torch_dtype".

    `stream` (optional): the tensors arrive one at a time, in state_dict order (e.g. gathered from FSDP shards);
    state_dict then only describes them (meta tensors: shapes and dtype) and each shard file is written as soon as
    its tensors have arrived, so the caller holds one shard, not the model. The files are the same, byte for byte.
    """
    out = Path(out_dir)
    max_bytes = parse_size(max_shard_size)
    with torch.device("meta"):
        expected = _expected_shapes(Qwen2(config))
    names = [n for n in state_dict if not (config.tie_word_embeddings and n == "lm_head.weight")]
    for name in names:
        if name not in expected:
            raise ValueError(f"save {out}: unexpected tensor {name!r} in the state dict (not a Qwen2 parameter)")
        t = state_dict[name]
        if t.shape != expected[name]:
            raise ValueError(
                f"save {out}: {name!r} has shape {tuple(t.shape)}, the config implies {tuple(expected[name])}"
            )
        if t.is_meta and stream is None:
            raise ValueError(f"save {out}: {name!r} is on the meta device (gather the full weights first)")
    missing = [n for n in expected if n not in state_dict]
    if missing:
        raise ValueError(f"save {out}: state dict lacks {missing[0]!r} ({len(missing)} missing)")
    dtypes = {state_dict[n].dtype for n in names}
    if len(dtypes) != 1:
        raise ValueError(f"save {out}: tensors have mixed dtypes {sorted(map(str, dtypes))}; cast them to one dtype")
    dtype_name = str(dtypes.pop()).removeprefix("torch.")

    sizes = {n: state_dict[n].numel() * state_dict[n].element_size() for n in names}
    shards = _shards(sizes, max_bytes)
    n = len(shards)
    files = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"save: {out} exists and is not a directory")
    _check_replaceable(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.saving-", dir=out.parent))
    old = None
    try:
        for file, shard in zip(files, shards):
            tensors = state_dict if stream is None else _next_tensors(stream, shard, out)
            _write_shard({_hf_name(name): _plain_tensor(tensors[name]) for name in shard}, tmp / file)
            del tensors
        if n > 1:
            weight_map = {_hf_name(name): file for file, shard in zip(files, shards) for name in shard}
            _write_json(tmp / INDEX_FILE, {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map})
        carried = source.config if source is not None else {}  # the ModelConfig's keys win over stale copies
        _write_json(tmp / "config.json", {**carried, **config_to_hf(config), "torch_dtype": dtype_name, "dtype": dtype_name})
        if generation_config is None and source is not None:
            generation_config = source.generation_config
        if generation_config is None and tokenizer is not None:
            generation_config = default_generation_config(tokenizer)
        if generation_config is not None:
            _write_json(tmp / "generation_config.json", generation_config)
        if tokenizer is not None:
            tokenizer.save(tmp)
        _fsync_tree(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old)  # rename over the empty placeholder directory
        os.replace(tmp, out)
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out.exists():
            os.replace(old, out)  # put the previous checkpoint back
            old = None
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out


def _next_tensors(stream: Iterator[tuple[str, torch.Tensor]], names: list[str], out: Path) -> dict[str, torch.Tensor]:
    """The next len(names) tensors of a stream, which must come in this order."""
    tensors = dict(itertools.islice(stream, len(names)))
    if list(tensors) != names:
        raise ValueError(f"save {out}: the stream gave {list(tensors)[:3]}..., expected {names[:3]}... in state_dict order")
    return tensors


def _check_replaceable(out: Path) -> None:
    """Saving replaces `out` as a whole: refuse unless it is new, empty, or a checkpoint (config.json, files only)."""
    if Path.cwd().resolve().is_relative_to(out.resolve()):
        raise ValueError(f"save: {out} is the working directory or holds it; save into a new subdirectory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    folders = [p.name for p in out.iterdir() if p.is_dir()]
    if not (out / "config.json").is_file() or folders:
        reason = f"it holds the folder {folders[0]!r}" if folders else "it has no config.json"
        raise ValueError(f"save: {out} is not empty and not a checkpoint ({reason}); saving would delete its "
                         "contents: pick a new or empty directory")


def save_model(
    model: Qwen2,
    out_dir: str | os.PathLike,
    max_shard_size: int | str = "5GB",
    generation_config: dict | None = None,
    tokenizer=None,
    source: SourceExtras | None = None,
) -> Path:
    """Save a model whose parameters are plain tensors as an HF checkpoint directory (see `save_state_dict`)."""
    return save_state_dict(model.state_dict(), model.config, out_dir, max_shard_size, generation_config, tokenizer,
                           source)
