"""Cross-check: TransformerLens 4's ViT bridge (`TransformerBridge` around a Hugging Face ViT) against
`HookedViT.from_hf` on the same random `ViTForImageClassification` (experiments/parity_hf.py's "vit" case).

    python experiments/bridge_vit.py

Prints the logits' difference, each hook point's shape and difference on both (the engine's hook points,
and those where the two differ by definition), the resid_pre sweep run as the engine runs it on HookedViT
and as one bridge forward per patch with the bridge's own hooks, and what the engine gets from the bridge
(it needs `start_at_layer`). tests/test_hooked_vit_hf.py asserts the same.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

ENGINE_HOOKS = ["hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out", "attn.hook_q",
                "attn.hook_k", "attn.hook_v", "attn.hook_z", "attn.hook_pattern", "mlp.hook_pre", "mlp.hook_post"]
"""Per-block hook points the engine patches (`caap.patching`), compared on both."""
OTHER_HOOKS = ["hook_embed", "hook_pos_embed", "blocks.0.attn.hook_attn_scores", "ln_final.hook_normalized"]


def boot_bridge(model: nn.Module, folder: str | Path) -> Any:
    """TransformerLens 4's `TransformerBridge` around a copy of `model` (the bridge rewires the modules it
    wraps), named by a local folder holding its config (a hub-style name sends the bridge to the hub)."""
    from transformer_lens.model_bridge import TransformerBridge

    wrapped = copy.deepcopy(model)
    wrapped.config.architectures = [type(model).__name__]
    wrapped.config.save_pretrained(folder)
    return TransformerBridge.boot_transformers(str(folder), hf_model=wrapped, device="cpu").eval()


def compare_hooks(bridge: Any, hooked: Any, x: torch.Tensor, names: list[str]) -> dict[str, str | float]:
    """Per hook point: max |bridge - HookedViT|, or why there is no number (missing, other shape)."""
    present = [n for n in names if n in bridge.hook_dict]
    with torch.no_grad():
        _, theirs = bridge.run_with_cache(x, names_filter=present)
        _, ours = hooked.run_with_cache(x, names_filter=names)
    out: dict[str, str | float] = {}
    for n in names:
        if n not in bridge.hook_dict:
            out[n] = "not on the bridge"
        elif theirs[n].shape != ours[n].shape:
            out[n] = f"bridge {list(theirs[n].shape)}, HookedViT {list(ours[n].shape)}"
        else:
            out[n] = (theirs[n] - ours[n]).abs().max().item()
    return out


def bridge_sweep(bridge: Any, source: torch.Tensor, context: torch.Tensor, target: int, n_layers: int, n_pos: int
                 ) -> torch.Tensor:
    """The resid_pre sweep on the bridge, one full forward per (layer, position) with the bridge's hooks:
    [n_layers, n_pos] target logits."""
    names = [f"blocks.{layer}.hook_resid_pre" for layer in range(n_layers)]
    with torch.no_grad():
        _, src = bridge.run_with_cache(source, names_filter=names)
    out = torch.zeros(n_layers, n_pos)
    for layer, name in enumerate(names):
        for p in range(n_pos):
            def write(act: torch.Tensor, hook: Any, p: int = p, name: str = name) -> torch.Tensor:
                act = act.clone()
                act[:, p] = src[name][:, p]
                return act

            with torch.no_grad():
                out[layer, p] = bridge.run_with_hooks(context, fwd_hooks=[(name, write)])[0, target]
    return out


def engine_on_bridge(bridge: Any, source: torch.Tensor, context: torch.Tensor, target: int, n_layers: int,
                     n_pos: int) -> torch.Tensor | str:
    """The engine's resid_pre rows run on the bridge: the scores, or the bridge's refusal."""
    from caap.patching import Intervention, logit_score, run_interventions

    rows = [Intervention.single(f"blocks.{layer}.hook_resid_pre", p) for layer in range(n_layers) for p in range(n_pos)]
    try:
        return run_interventions(bridge, rows, source, context, logit_score(target)).view(n_layers, n_pos)
    except NotImplementedError as e:
        return f"{type(e).__name__}: {e}"


def main() -> None:
    import importlib.metadata
    import importlib.util
    import sys

    import transformers

    from caap.patching import logit_score, sweep

    spec = importlib.util.spec_from_file_location("parity_hf", Path(__file__).with_name("parity_hf.py"))
    parity = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = parity
    spec.loader.exec_module(parity)
    model = parity.build("vit")
    hooked = parity.convert(model)
    with tempfile.TemporaryDirectory() as folder:
        bridge = boot_bridge(model, folder)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(12))
    print(f"transformers {transformers.__version__}, transformer_lens {importlib.metadata.version('transformer-lens')}; "
          f"random ViTForImageClassification (2 layers, width 32, 17 tokens); max |bridge - HookedViT.from_hf|")
    with torch.no_grad():
        print(f"logits: {(bridge(x) - hooked(x)).abs().max().item():.1e}")
    names = [f"blocks.{layer}.{n}" for layer in range(2) for n in ENGINE_HOOKS]
    worst = max(v for v in compare_hooks(bridge, hooked, x, names).values() if isinstance(v, float))
    print(f"the engine's {len(names)} hook points ({', '.join(ENGINE_HOOKS)}; both blocks): at most {worst:.1e}")
    for name, value in compare_hooks(bridge, hooked, x, OTHER_HOOKS).items():
        print(f"  {name}: {value if isinstance(value, str) else f'{value:.3g}'}")
    with torch.no_grad():
        _, theirs = bridge.run_with_cache(x, names_filter=["blocks.0.attn.hook_attn_scores", "blocks.0.attn.hook_pattern"])
    same = (theirs["blocks.0.attn.hook_attn_scores"] - theirs["blocks.0.attn.hook_pattern"]).abs().max().item()
    print(f"  the bridge's blocks.0.attn.hook_attn_scores - its hook_pattern: {same:.1e}")
    source, context, target = x[:1], x[1:], 4
    ours = sweep(hooked, source, context, logit_score(target), component="resid_pre", progress=False).values[0]
    loop = bridge_sweep(bridge, source, context, target, 2, hooked.cfg.n_ctx)
    print(f"resid_pre sweep (2 layers x 17 positions): engine on HookedViT vs one bridge forward per patch: "
          f"{(ours - loop).abs().max().item():.1e}")
    on_bridge = engine_on_bridge(bridge, source, context, target, 2, hooked.cfg.n_ctx)
    print("the engine on the bridge: " + (on_bridge if isinstance(on_bridge, str) else
                                           f"max |difference| {(on_bridge - ours).abs().max().item():.1e}"))


if __name__ == "__main__":
    main()
