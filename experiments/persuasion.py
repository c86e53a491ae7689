"""Persuasion heads in SmolLM2-135M-Instruct (after "How LLMs Are Persuaded: A Few Attention Heads, Rerouted").

    python experiments/persuasion.py                 # the full run (about 15-20 min on 2 CPU cores)
    python experiments/persuasion.py --small         # a few prompts, fewer heads (the notebook test's setting)
    python experiments/persuasion.py --model PATH    # another local GGUF file or Hugging Face folder

Steps (each prints a table; everything also goes to results/persuasion/persuasion.json, and the prompt
set to results/persuasion/prompts.csv):

1. the prompt set (`caap.persuasion.build_questions` / `build_pairs`): two-option questions, a clean and a
   persuaded prompt each, of equal token length; split into a discovery half and a held-out half;
2. the persuasion effect on every pair: logit difference (right - pushed option), accuracy, flip rate,
   with 95% Student-t intervals (`caap.stats.mean_ci`);
3. head patching through the engine (`caap.patching.sweep`, component z at the answer position, every
   head, one head per batch row) on the discovery pairs the persuasion moves most, persuaded -> clean and
   clean -> persuaded; the top heads by the mean of the two are the "found" heads;
4. path patching heads -> logits (`caap.patching.path_patch`) for the top heads of step 3;
5. the attention of the found heads from the answer position to the right option, the pushed option
   and the hint words, clean vs persuaded (discovery half);
6. the causal check on the held-out half: mean-ablating the found heads at the answer position against
   random head sets of the same size: the share of the persuasion removed, and clean accuracy;
7. the rank-one claim: one direction per found head in its query at the answer position (mean
   persuaded - clean query on the discovery half), projected out (or subtracted) on the held-out half,
   against random directions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from caap import persuasion as P
from caap.language_models import SMOLLM2_GGUF, shared_language_model
from caap.stats import mean_ci

MODEL_FILE = SMOLLM2_GGUF
OUT = ROOT / "results" / "persuasion"


@dataclass
class Settings:
    n_questions: int | None = None  # None: all
    patch_pairs: int = 2  # discovery pairs for head patching (each: 2 x 270 patched runs)
    patch_layers: list[int] | None = None  # None: every layer
    k_heads: int = 5  # the "found" heads
    path_senders: int = 20  # heads (top of head patching) whose direct path to the logits is measured
    causal_pairs: int = 40  # held-out pairs for the ablation and the rank-one checks
    n_random: int = 10  # random head sets / random directions
    seed: int = 0

    @classmethod
    def small(cls) -> "Settings":
        return cls(n_questions=24, patch_pairs=1, patch_layers=list(range(24, 30)), k_heads=3, path_senders=6,
                   causal_pairs=8, n_random=2)


def default_model_path() -> Path:
    path = shared_language_model(MODEL_FILE)
    if path is None:
        raise FileNotFoundError(f"no models/{MODEL_FILE} in the shared folder (../shared or $CAAP_SHARED_DIR): give --model PATH")
    return path


def fmt_ci(ci: tuple[float, float, int], digits: int = 2) -> str:
    mean, half, _ = ci
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def run(model, settings: Settings, log=print) -> dict:
    """Every step on `model` (a TransformerLens model with `model.tokenizer`); prints the tables with
    `log` and returns the numbers."""
    t_all = time.time()
    res: dict = {"settings": settings.__dict__}
    # 1. prompts
    questions = P.build_questions(seed=settings.seed)
    if settings.n_questions is not None:
        questions = questions[: settings.n_questions]
    pairs = P.build_pairs(model.tokenizer, questions, seed=settings.seed, n_ctx=model.cfg.n_ctx)
    disc, held = P.split_halves(pairs, seed=settings.seed)
    lens = [len(t) for t in pairs.clean]
    log(f"1. prompt set: {len(questions)} questions -> {len(pairs)} pairs of equal token length "
        f"({min(lens)}-{max(lens)} tokens); discovery {len(disc)}, held-out {len(held)}")
    log(f"   example, clean:     {pairs.texts[0][0].split('user')[1].split('<|im_end|>')[0].strip()}")
    log(f"   example, persuaded: {pairs.texts[0][1].split('user')[1].split('<|im_end|>')[0].strip()}")
    res["n_pairs"], res["n_discovery"], res["n_heldout"] = len(pairs), len(disc), len(held)

    # 2. behaviour
    t = time.time()
    b_disc, b_held = P.measure(model, disc), P.measure(model, held)
    rows = []
    res["effect"] = {}
    for name in P.effect_table(b_disc):
        d, h = P.effect_table(b_disc)[name], P.effect_table(b_held)[name]
        res["effect"][name] = {"discovery": d, "heldout": h}
        rows.append([name, fmt_ci(d), fmt_ci(h)])
    log(f"\n2. persuasion effect (mean ± 95% CI; logit diff = right - pushed option, first token) [{time.time() - t:.0f} s]")
    log(table(rows, ["measure", f"discovery (n={len(disc)})", f"held-out (n={len(held)})"]))

    # 3. head patching
    t = time.time()
    order = b_disc.effect.argsort(descending=True)[: settings.patch_pairs].tolist()
    hp = P.head_patching(model, disc, order, layers=settings.patch_layers)
    combined = (hp["persuaded->clean"] + hp["clean->persuaded"]) / 2
    found = P.top_heads(combined, settings.k_heads)
    top = P.top_heads(combined, max(settings.k_heads, settings.path_senders))
    res["head_patching"] = {k: v.mean(0).tolist() for k, v in hp.items()}
    res["head_patching_pairs"] = order
    log(f"\n3. head patching at the answer position, {len(order)} discovery pair(s) (those the persuasion moves "
        f"most), {len(settings.patch_layers or range(model.cfg.n_layers)) * model.cfg.n_heads} heads, normalised "
        f"(1 = the other prompt's logit diff) [{time.time() - t:.0f} s]")
    rows = [[f"L{layer}H{h}", f"{hp['persuaded->clean'].mean(0)[layer, h]:.3f}",
             f"{hp['clean->persuaded'].mean(0)[layer, h]:.3f}", f"{combined.mean(0)[layer, h]:.3f}"] for layer, h in top[:10]]
    log(table(rows, ["head", "persuaded -> clean", "clean -> persuaded", "mean"]))
    res["found_heads"] = found
    log(f"   found heads (top {settings.k_heads} by the mean of both directions): {', '.join(f'L{a}H{b}' for a, b in found)}")

    # 4. path patching
    t = time.time()
    pp = P.path_patching_to_logits(model, disc, order, top)
    res["path_patching"] = {f"L{a}H{b}": float(v) for (a, b), v in zip(top, pp.mean(0))}
    log(f"\n4. path patching head -> logits (direct path; persuaded -> clean, other heads frozen), same pairs, "
        f"normalised [{time.time() - t:.0f} s]")
    srt = sorted(zip(top, pp.mean(0).tolist()), key=lambda x: -x[1])
    log(table([[f"L{a}H{b}", f"{v:.3f}"] for (a, b), v in srt[:10]], ["head", "direct effect"]))

    # 5. attention
    att = P.attention_to_spans(b_disc, disc, found)
    res["attention"] = {f"{h} -> {tg}": {"clean": c, "persuaded": p} for (h, tg), (c, p) in att.items()}
    log("\n5. attention from the answer position (sum over the span's tokens; discovery half, mean ± 95% CI)")
    rows = []
    for (h, tg), (c, p) in att.items():
        rows.append([h, {"right": "right option", "pushed": "pushed option (list)", "hint": "hint words"}[tg],
                     fmt_ci(c, 3), fmt_ci(p, 3)])
    log(table(rows, ["head", "to", "clean", "persuaded"]))

    # 6. ablation on the held-out half
    t = time.time()
    sub = held.subset(range(min(settings.causal_pairs, len(held))))
    b_sub = b_held.subset(range(len(sub)))
    resid = P.residual_streams(model, sub)

    def evaluate(edits: dict) -> dict:
        """The edit applied to the model on the held-out pairs' clean and persuaded prompts."""
        ld_c = P.run_edited(model, sub, edits, "clean", resid)
        ld_p = P.run_edited(model, sub, edits, "persuaded", resid)
        return {"removed": P.removed_fraction(b_sub.ld_clean, b_sub.ld_persuaded, ld_c, ld_p),
                "effect": mean_ci(ld_c - ld_p), "clean_accuracy": mean_ci((ld_c > 0).float()),
                "clean_ld_change": mean_ci(ld_c - b_sub.ld_clean)}

    def random_summary(entries: list[dict]) -> str:
        return fmt_ci(mean_ci([e["removed"] for e in entries]), 3)

    mean_z = torch.cat([b_disc.z_clean, b_disc.z_persuaded]).mean(0)  # [layer, head, d_head]
    sets = {"found heads": found}
    for i, s in enumerate(P.random_head_sets(model, len(found), settings.n_random, found, seed=settings.seed)):
        sets[f"random set {i + 1}"] = s
    rows, res["ablation"] = [], {}
    for name, heads in sets.items():
        e = evaluate(P.mean_ablation(heads, mean_z))
        res["ablation"][name] = {"heads": heads, **e}
        rows.append([name, ", ".join(f"L{a}H{b}" for a, b in heads), f"{e['removed']:.3f}", fmt_ci(e["effect"]),
                     fmt_ci(e["clean_accuracy"])])
    base = ["none", "", "0", fmt_ci(mean_ci(b_sub.effect)), fmt_ci(mean_ci((b_sub.ld_clean > 0).float()))]
    randoms = [v for k, v in res["ablation"].items() if k.startswith("random")]
    log(f"\n6. mean ablation at the answer position (z := its discovery mean), held-out pairs (n={len(sub)}); "
        f"persuasion removed = 1 - effect after / effect before [{time.time() - t:.0f} s]")
    log(table([base, *rows], ["ablated", "heads", "persuasion removed", "persuasion effect", "clean accuracy"]))
    log(f"   random sets of {len(found)} heads: persuasion removed {random_summary(randoms)} (mean ± 95% CI over "
        f"{len(randoms)} sets); rank of the found heads: "
        f"{1 + sum(r['removed'] > res['ablation']['found heads']['removed'] for r in randoms)} of {len(randoms) + 1}")

    # 7. rank one
    t = time.time()
    li = torch.tensor([a for a, _ in found])
    hi = torch.tensor([b for _, b in found])
    dirs = (b_disc.q_persuaded - b_disc.q_clean).mean(0)[li, hi]  # [k, d_head]
    g = torch.Generator().manual_seed(settings.seed)
    conds = {"found direction, projected out": P.direction_edit(found, dirs, "project")}
    for i in range(settings.n_random):
        conds[f"random direction {i + 1}, projected out"] = P.direction_edit(found, torch.randn(dirs.shape, generator=g), "project")
    rows, res["rank_one"] = [], {}
    for name, edits in conds.items():
        e = evaluate(edits)
        res["rank_one"][name] = e
        rows.append([name, f"{e['removed']:.3f}", fmt_ci(e["effect"]), fmt_ci(e["clean_accuracy"]), fmt_ci(e["clean_ld_change"])])
    randoms = [v for k, v in res["rank_one"].items() if k.startswith("random")]
    log(f"\n7. rank one: one direction per found head, in its query at the answer position (the discovery half's "
        f"mean persuaded - clean query), projected out on held-out pairs (n={len(sub)}), clean and persuaded "
        f"prompts alike [{time.time() - t:.0f} s]")
    log(table(rows, ["edit", "persuasion removed", "persuasion effect", "clean accuracy", "clean logit diff change"]))
    log(f"   random directions: persuasion removed {random_summary(randoms)} (mean ± 95% CI over {len(randoms)})")
    res["seconds"] = time.time() - t_all
    log(f"\ntotal {res['seconds']:.0f} s")
    return res


def write_prompts(pairs: P.PairSet, path: Path) -> None:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["kind", "question", "right", "pushed", "n_tokens", "clean_prompt", "persuaded_prompt"])
        for q, c, (ct, pt) in zip(pairs.questions, pairs.clean, pairs.texts):
            w.writerow([q.kind, q.text, q.right, q.wrong, len(c), ct, pt])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=None, help=f"a .gguf file or HF folder (default: ../shared/models/{MODEL_FILE})")
    ap.add_argument("--small", action="store_true", help="a few prompts and heads (the notebook test's setting)")
    ap.add_argument("--out", type=Path, default=OUT, help="folder for persuasion.json and prompts.csv")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from caap.language_models import load_language_model

    torch.manual_seed(0)
    t = time.time()
    model = load_language_model(args.model or default_model_path())
    print(f"loaded in {time.time() - t:.0f} s: {model.cfg.n_layers} layers x {model.cfg.n_heads} heads")
    settings = Settings.small() if args.small else Settings()
    res = run(model, settings)
    if not args.small:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "persuasion.json").write_text(json.dumps(res, indent=1))
        qs = P.build_questions(seed=settings.seed)
        write_prompts(P.build_pairs(model.tokenizer, qs, seed=settings.seed), args.out / "prompts.csv")
        print(f"wrote {args.out / 'persuasion.json'} and {args.out / 'prompts.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
