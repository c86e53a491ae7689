"""Head patching on SmolLM2-135M-Instruct: the engine against TransformerLens' own loop, timed in one run.

    python experiments/speed_lm_heads.py              # ../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf, CPU
    python experiments/speed_lm_heads.py --model PATH --rounds 2

The task: every head's output (`hook_z`) at the answer position, persuaded prompt into clean prompt, for
one prompt pair of the persuasion set (`caap.persuasion`): 30 layers x 9 heads = 270 patched runs. Scored
by the logit difference (right - pushed option) at the last position.

- TransformerLens: `transformer_lens.patching.generic_activation_patch` with an index table of (layer,
  answer position, head) and `layer_pos_head_vector_patch_setter`: one full forward per head (what
  `get_act_patch_attn_head_out_by_pos` does, restricted to the answer position).
- caap: `caap.patching.sweep(component="z", positions=[-1])`: the 270 runs batched (the engine's default
  batch size), each batch started at its head's layer from the clean run's residual stream (with
  `caap.language_models`' skipping of the blocks before it).

Both run on the same TransformerBridge (TransformerLens 4) and must give the same values; the script
prints both times and their ratio (rounds alternate the two; medians).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # generic_activation_patch's progress bar
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from caap import persuasion as P
from caap.cpu import keep_freed_memory
from caap.language_models import SMOLLM2_GGUF, load_language_model, shared_language_model
from caap.patching import sweep


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--pair", type=int, default=0, help="which pair of the prompt set")
    args = ap.parse_args(argv)
    import pandas as pd
    from transformer_lens import patching

    keep_freed_memory()
    path = args.model or shared_language_model()
    if path is None:
        raise SystemExit(f"no models/{SMOLLM2_GGUF} in the shared folder (../shared or $CAAP_SHARED_DIR): give --model PATH")
    model = load_language_model(path)
    pairs = P.build_pairs(model.tokenizer, P.build_questions())
    clean, persuaded = pairs.batch([args.pair])
    right, pushed = pairs.right_tok[[args.pair]], pairs.pushed_tok[[args.pair]]
    score = P.logit_diff_fn(right, pushed)
    L, H, last = model.cfg.n_layers, model.cfg.n_heads, clean.shape[1] - 1
    print(f"{L} x {H} = {L * H} heads, prompt of {clean.shape[1]} tokens, torch threads {torch.get_num_threads()}")

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return (logits[0, -1, right[0]] - logits[0, -1, pushed[0]]).detach()

    index = pd.DataFrame([(layer, last, h) for layer in range(L) for h in range(H)], columns=["layer", "pos", "head_index"])

    def tl() -> torch.Tensor:
        with torch.inference_mode():
            _, cache = model.run_with_cache(persuaded)
            return patching.generic_activation_patch(
                model, clean, cache, metric, patching.layer_pos_head_vector_patch_setter, "z", index_df=index
            ).view(L, H)

    def ours() -> torch.Tensor:
        return sweep(model, persuaded, clean, score, component="z", positions=[-1], progress=False).values[0, :, 0]

    times: dict[str, list[float]] = {"TransformerLens generic_activation_patch": [], "caap engine (sweep)": []}
    results = {}
    for _ in range(args.rounds):
        for name, fn in zip(times, (tl, ours)):
            t = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - t)
    a, b = results.values()
    diff = float((a - b).abs().max())
    print(f"largest difference between the two results: {diff:.2e} (logit diff range {float(a.min()):.2f}..{float(a.max()):.2f})")
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k}: {v:.1f} s ({args.rounds} round(s): {', '.join(f'{x:.1f}' for x in times[k])})")
    tl_t, ours_t = med.values()
    print(f"speedup: {tl_t / ours_t:.2f}x")
    if diff > 1e-3:
        print("the two results differ: check before quoting the speedup")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
