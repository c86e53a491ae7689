"""Language models for the patching engine: a local file or folder -> a TransformerLens model.

    from caap.language_models import load_language_model
    model = load_language_model("../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf")   # or an HF folder
    tokens = model.tokenizer.apply_chat_template(...)        # the model's own tokenizer (model.tokenizer)
    sweep(model, persuaded, clean, score_fn, component="z", positions=[-1])          # caap.patching

TransformerLens 4 removed `HookedTransformer` in favour of `TransformerBridge`, which wraps the Hugging
Face model itself and keeps TransformerLens' hook names (`blocks.{l}.attn.hook_z`, `hook_resid_pre`, ...),
`run_with_cache`, `hooks()` and `forward(x, start_at_layer=..., stop_at_layer=...)`: all the engine uses,
so `sweep`, `path_patch` and `run_interventions` run on a bridge as on a `HookedViT`. This module makes
bridges:

- `load_language_model(path)`: a GGUF file (dequantised by `transformers`, which needs the `gguf`
  package, one of caap's dependencies) or a Hugging Face model folder (config.json + weights), offline.
- `bridge_from_hf(hf_model, tokenizer)`: a bridge around a Hugging Face causal LM already in memory
  (e.g. a small random one built from a config, as the tests do).
- `skip_blocks_before_start(bridge)`: the bridge's `start_at_layer` still runs blocks 0..k-1 and
  discards what they compute; the engine starts most of its runs at a later block, so the two functions
  above make those blocks pass their input through instead (checked at load against the unmodified
  run; results are the same, patching runs take about (n_layers - k) / n_layers of the time).

Bad input is refused with one clear error: a missing path (`FileNotFoundError`), a file that is not a
model (`ValueError`), GGUF without the `gguf` reader (`ImportError`), token sequences longer than the
model's context and clean / persuaded prompts of different lengths (`check_tokens`, `ValueError`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

GGUF_MAGIC = b"GGUF"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The real language model in the shared folder (../shared/models; its README describes it)."""


def shared_language_model(name: str = SMOLLM2_GGUF) -> Path | None:
    """`<shared folder>/models/<name>` (`caap.data.shared_dir`: ../shared or $CAAP_SHARED_DIR), or None."""
    from caap.data import shared_dir

    root = shared_dir()
    path = root / "models" / name if root else None
    return path if path is not None and path.is_file() else None


def _resolve(path: str | os.PathLike) -> tuple[Path, str | None]:
    """(folder, GGUF file name or None) for a .gguf file, a folder holding one, or an HF model folder."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(
            f"no language model at {p}: give a .gguf file or a Hugging Face model folder (config.json and weights)"
        )
    if p.is_dir():
        if (p / "config.json").is_file():
            return p, None
        ggufs = sorted(x.name for x in p.glob("*.gguf"))
        if len(ggufs) == 1:
            return p, ggufs[0]
        raise FileNotFoundError(
            f"{p} is neither a Hugging Face model folder (no config.json) nor a folder with one .gguf file "
            f"({len(ggufs)} found{': ' + ', '.join(ggufs) if ggufs else ''}); give the file itself"
        )
    if p.suffix.lower() != ".gguf":
        raise ValueError(
            f"{p} is not a language model file caap reads: give a .gguf file or a Hugging Face model folder"
        )
    try:
        with open(p, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise ValueError(f"cannot read {p}: {e.strerror or e}") from e
    if head != GGUF_MAGIC:
        raise ValueError(f"{p} is not a GGUF file (it does not start with 'GGUF'): a truncated or wrong file?")
    return p.parent, p.name


def load_hf(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """(Hugging Face causal LM in eval mode, its tokenizer) from a local GGUF file or model folder,
    without network. A GGUF file is dequantised to `dtype` (about 25 s for 135 M parameters on 2 CPU
    cores)."""
    folder, gguf_file = _resolve(path)
    if gguf_file is not None and importlib.util.find_spec("gguf") is None:
        raise ImportError(
            "reading a GGUF file needs the `gguf` package, which caap's dependencies include: "
            "pip install -e . (or pip install gguf)"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"local_files_only": True}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    where = folder / gguf_file if gguf_file else folder
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    except Exception as e:  # transformers' readers fail in many ways on a bad file (struct.error, KeyError, ...)
        raise ValueError(f"could not load a causal language model from {where}: {type(e).__name__}: {e}") from e
    return model.eval(), tokenizer


def bridge_from_hf(hf_model: Any, tokenizer: Any, device: str | torch.device | None = None, fast_start: bool = True) -> Any:
    """A TransformerLens 4 `TransformerBridge` around a Hugging Face causal LM in memory (no download).

    The tokenizer is kept as it is: TransformerLens would otherwise reload it from the hub to make it
    prepend a BOS token (SmolLM2's adds none; the tokens the engine sees are the caller's anyway).
    `fast_start`: `skip_blocks_before_start` (see the module's docstring)."""
    from transformer_lens.model_bridge import TransformerBridge

    if tokenizer is None:
        raise ValueError("bridge_from_hf needs the model's tokenizer (TransformerLens would fetch one from the hub)")
    # TransformerLens reloads a tokenizer whose init_kwargs lack add_bos_token=True (from name_or_path: the
    # hub); these two entries only stop that: the tokenizer's own behaviour (add a BOS or not) is unchanged
    tokenizer.init_kwargs.setdefault("name_or_path", getattr(tokenizer, "name_or_path", "") or "local")
    tokenizer.init_kwargs["add_bos_token"] = True
    device = device if device is not None else next(hf_model.parameters()).device
    name = getattr(hf_model.config, "_name_or_path", "") or type(hf_model).__name__
    bridge = TransformerBridge.boot_transformers(str(name), hf_model=hf_model.eval(), tokenizer=tokenizer, device=device)
    bridge.eval()
    if fast_start:
        skip_blocks_before_start(bridge)
    return bridge


def load_language_model(
    path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    fast_start: bool = True,
) -> Any:
    """A local language model (a .gguf file, a folder with one, or a Hugging Face model folder) as a
    TransformerLens 4 `TransformerBridge` ready for `caap.patching` (eval mode, `model.tokenizer` set)."""
    hf_model, tokenizer = load_hf(path, dtype=dtype)
    if device is not None:
        hf_model = hf_model.to(device)
    return bridge_from_hf(hf_model, tokenizer, device=device, fast_start=fast_start)


# ---------------------------------------------------------------------------------------- fast start
def skip_blocks_before_start(bridge: Any, check: bool = True) -> bool:
    """Make the bridge's blocks before `start_at_layer` pass their input through instead of computing an
    output that is discarded anyway. With `check`, a run from block 1 on random values is compared with
    the bridge's own (unmodified) result first; where they differ (another architecture's block calling
    convention) nothing is changed. Returns whether the blocks now skip."""
    blocks = list(getattr(bridge, "blocks", []))
    if len(blocks) < 2 or bridge.__dict__.get("_caap_fast_start", False):
        return bool(bridge.__dict__.get("_caap_fast_start", False))
    if check:
        g = torch.Generator().manual_seed(0)
        param = next(bridge.parameters())
        resid = torch.randn(1, 3, bridge.cfg.d_model, generator=g).to(param.device, param.dtype)
        with torch.inference_mode():
            expected = bridge(resid, start_at_layer=1)
    # set in the instance's __dict__: the bridge's components forward other attribute writes to the HF module
    originals = []
    for block in blocks:
        originals.append(block.forward)
        block.__dict__["forward"] = _skipping_forward(block, block.forward)
    if check:
        with torch.inference_mode():
            got = bridge(resid, start_at_layer=1)
        if got.shape != expected.shape or not torch.allclose(got, expected, atol=1e-5, rtol=1e-4):
            for block in blocks:
                block.__dict__.pop("forward", None)
            return False
    bridge.__dict__["_caap_fast_start"] = True
    return True


def _skipping_forward(block: Any, forward: Any) -> Any:
    layer = block._extract_layer_idx()

    def skipping_forward(*args: Any, **kwargs: Any) -> Any:
        start = getattr(block, "_start_at_layer_idx", None)
        if start is not None and layer is not None and layer < start:
            return args[0] if args else kwargs["hidden_states"]  # discarded: block `start` swaps in the residual
        return forward(*args, **kwargs)

    return skipping_forward


@contextlib.contextmanager
def last_position_logits(model: Any) -> Iterator[Any]:
    """Inside this context the model computes logits for the last position only ([batch, 1, vocab]):
    the unembedding of a 49k-token vocabulary at every position costs as much as 8 of SmolLM2's 30
    blocks, and scores that read `output[:, -1]` need only the last. (A hook on the unembedding's input
    keeps the last position; the engine's hooks work inside it as usual.)"""
    name = "unembed.hook_in" if "unembed.hook_in" in model.hook_dict else "ln_final.hook_normalized"
    with model.hooks(fwd_hooks=[(name, lambda act, hook: act[:, -1:])]):
        yield model


# ---------------------------------------------------------------------------------------- checks
def n_ctx(model: Any) -> int:
    """The model's context length (TransformerLens' cfg.n_ctx)."""
    return int(model.cfg.n_ctx)


def check_tokens(model: Any, tokens: Tensor, other: Tensor | None = None, what: str = "prompt") -> None:
    """Refuse token sequences the model cannot take or that do not align position by position:
    longer than the model's context, or (with `other`, e.g. clean and persuaded prompts) of another
    length than `other`."""
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, pos]; got shape {tuple(tokens.shape)}")
    limit = n_ctx(model)
    for t in (tokens,) if other is None else (tokens, other):
        if t.shape[-1] > limit:
            raise ValueError(f"a {what} of {t.shape[-1]} tokens is longer than the model's context ({limit} tokens)")
    if other is not None and other.shape != tokens.shape:
        raise ValueError(
            f"clean and persuaded {what}s differ in length ({tokens.shape[-1]} vs {other.shape[-1]} tokens) "
            f"or number ({tokens.shape[0]} vs {other.shape[0]}): positions would not align; pad the shorter one "
            f"with a neutral sentence of the same length"
        )


def check_heads(model: Any, heads: Any) -> list[tuple[int, int]]:
    """(layer, head) pairs, each checked against the model's layers and heads (`caap.patching.path.check_head`)."""
    from caap.patching.path import check_head

    return [check_head(model.cfg, item) for item in heads]
