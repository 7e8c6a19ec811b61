"""
The five seed reports (../shared/seeds/000-004) as data: the figures they published, and each key
claim as a rule over quantities that reproduce.py measures. Nothing here runs anything.

A quantity is "run:key" (e.g. "aux:masked/0.95/ppl"): the mean and std over random seeds of one
figure of one reproduce.py run. A claim is (seed, what it says, rule, quantities, the seed's own
size of the effect in % or None); the rules are reproduce.RULES.
"""

TAU = 0.95  # headline threshold: the seeds' "quality" setting (seed 000 finding 4, seed 003's recommended config)

# seed 000 (and 001, the same runs under other names): threshold -> (PPL, Shallow%, Compute%)
S000_AUX = {0.5: (40.61, 95.5, 36.3), 0.7: (39.41, 88.7, 40.9), 0.8: (40.36, 83.7, 44.2), 0.9: (36.98, 71.8, 52.1),
            0.95: (32.21, 57.1, 61.9)}
S000_DS = {0.5: (43.05, 95.1, 36.6), 0.7: (44.44, 89.9, 40.1), 0.8: (45.89, 85.2, 43.2), 0.9: (47.38, 75.5, 49.7),
           0.95: (48.16, 64.6, 56.9)}
S000 = {"aux": (23.98, 52.3, 65.2), "deepsup": (28.13, 80.0, 46.6), "std3L": 34.86, "std1L": 35.29}
LABELS = {"000": {"e3": "Auxiliary Loss Training", "e4": "Deep Supervision Training", "aux": "Auxiliary Loss (Early Exit)",
                  "deepsup": "Deep Supervision + Early Exit", "aux_c": "Auxiliary Loss Training",
                  "deepsup_c": "Deep Supervision + Early Exit"},
          "001": {"e3": "Standard Training (Auxiliary Loss)", "e4": "LPT Training", "aux": "Confidence-Routed",
                  "deepsup": "Routed + LPT", "aux_c": "Standard Routing", "deepsup_c": "LPT Routing"}}
# seed 002: threshold -> (PPL, Shallow%, Compute%, ΔPPL%)
S002 = {0.0: (14.51, 100.0, 50.0, 3.1), 0.1: (14.51, 100.0, 50.0, 3.1), 0.2: (14.45, 99.7, 50.2, 2.7),
        0.3: (14.58, 97.0, 51.5, 3.6), 0.4: (14.64, 91.4, 54.3, 4.1), 0.5: (14.80, 85.4, 57.3, 5.2),
        0.6: (14.89, 79.9, 60.1, 5.8), 0.7: (14.38, 73.2, 63.4, 2.2), 0.8: (14.04, 62.6, 68.7, -0.2),
        0.9: (14.20, 37.6, 81.2, 0.9), 1.0: (14.07, 0.0, 100.0, 0.0)}
# seed 003: alpha -> (PPL, Shallow%, Compute%) at 0.95; threshold -> the same for alpha 0.7 and asym_deepsup
S003_ALPHA = {0.3: (24.88, 72.0, 52.0), 0.5: (23.98, 52.3, 65.2), 0.7: (22.95, 52.4, 65.0)}
S003_T07 = {0.5: (41.62, 94.4, 37.0), 0.7: (40.48, 87.8, 41.4), 0.8: (40.57, 84.5, 43.6), 0.9: (36.94, 73.4, 51.1),
            0.95: (31.46, 59.7, 60.2)}
S003_ADS = {0.7: (50.24, 91.0, 39.4), 0.8: (51.46, 87.5, 41.7), 0.9: (53.10, 79.0, 47.4), 0.95: (54.90, 68.9, 54.0)}
S003 = {"asym": (22.95, 52.4, 65.0), "asym_deepsup": (32.07, 86.3, 42.5)}
# seed 004: metric -> (distill, loss, softmax)
S004 = {"Final PPL": ("1095.46", "1071.76", "1219.52"), "Accuracy": ("16.82%", "16.81%", "16.78%"),
        "Shallow ratio": ("50.7%", "49.3%", "72.8%"), "Compute savings (layers)": ("25.3%", "24.6%", "36.4%"),
        "Block 0 val_ppl": ("564.95",) * 3, "Block 1 val_ppl": ("522.28", "445.48", "736.13"),
        "Threshold (Block 0)": ("0.1738", "0.0481", "0.1492"), "avg_label (Block 0)": ("0.184", "0.074", "-")}
S004_METHODS = ("distill", "loss", "softmax")

S2 = "seed002-4L"


def at(run, t, figure="ppl", mode="masked"):
    """The quantity name of one run's figure at threshold t."""
    return f"{run}:{mode}/{t:g}/{figure}"


def ec(figure):
    """seed 004's figure for each of its three methods, in S004_METHODS order."""
    return [f"seed004:{m}/{figure}" for m in S004_METHODS]


CLAIMS = [
    ("000/001", "Routing an aux-trained model beats Standard 3L in PPL (23.98 vs 34.86, -31.2%)",
     "lower", [at("aux", TAU), "std3L:full/ppl"], -31.2),
    ("000/001", "... and cuts compute by 34.8% (65.2% of 3L)", "saves", [at("aux", TAU, "compute")], 34.8),
    ("000/001", "A higher threshold gives a lower PPL (more tokens take the deep path)",
     "falls", [at("aux", t) for t in S000_AUX], None),
    ("000/001", "Threshold 0.95 is the quality setting, 0.5 the speed setting (lower PPL, and lower compute)",
     "pairs_lower", [at("aux", 0.95), at("aux", 0.5), at("aux", 0.5, "compute"), at("aux", 0.95, "compute")], None),
    ("000/001", "Deep supervision (LPT) + early exit beats Standard 3L (28.13 vs 34.86, -19.3%)",
     "lower", [at("deepsup", TAU), "std3L:full/ppl"], -19.3),
    ("000/001", "... and cuts compute by 53.4% (46.6% of 3L)", "saves", [at("deepsup", TAU, "compute")], 53.4),
    ("000/001", "... but aux routing is better than deepsup routing (23.98 vs 28.13, 14.7% better)",
     "lower", [at("aux", TAU), at("deepsup", TAU)], -14.7),
    ("002", "Deep supervision + early exit keeps PPL within +5% at every threshold from 0.0 to 0.8",
     "at_most", [at(S2, t, "delta_ppl") for t in S002 if t <= 0.8], 5.0),
    ("002", "The best threshold is about 0.8: PPL kept (-0.2%) ...", "not_above", [at(S2, 0.8), f"{S2}:full/ppl"], None),
    ("002", "... with 31% compute saved", "saves", [at(S2, 0.8, "compute")], 31.3),
    ("002", "At a suitable threshold early exit improves PPL over full depth (the exit predicts some tokens better): "
     "the threshold best on valid, on test", "picked",
     [f"{S2}:test/full/ppl", *(at(S2, t) for t in S002 if t < 1), *(f"{S2}:test/masked/{t:g}/ppl" for t in S002 if t < 1)],
     None),
    ("002", "Threshold 0 saves 50% compute for about +3% PPL (within +5%)", "at_most", [at(S2, 0, "delta_ppl")], 5.0),
    ("002", "PPL is not monotone in the threshold (worse 0.0 -> 0.6, better 0.7 -> 0.8)",
     "bumpy", [at(S2, t) for t in S002], None),
    ("003", "asym α=0.7 without a middle-layer loss is the best of all methods (PPL 22.95)",
     "lowest", [at(n, TAU) for n in ("asym-a0.7", "aux", "deepsup", "asym-a0.3", "asym_deepsup-a0.7")], None),
    ("003", "... 34.2% better than Standard 3L in PPL", "lower", [at("asym-a0.7", TAU), "std3L:full/ppl"], -34.2),
    ("003", "... with 35.0% compute saved", "saves", [at("asym-a0.7", TAU, "compute")], 35.0),
    ("003", "... and 4.3% better than aux (α=0.5: 23.98)", "lower", [at("asym-a0.7", TAU), at("aux", TAU)], -4.3),
    ("003", "Weighting the exit more is better: PPL falls as α rises 0.3 -> 0.5 -> 0.7",
     "falls", [at(n, TAU) for n in ("asym-a0.3", "aux", "asym-a0.7")], None),
    ("003", "Adding a middle-layer loss worsens PPL by 39.8% (22.95 -> 32.07)",
     "lower", [at("asym-a0.7", TAU), at("asym_deepsup-a0.7", TAU)], -28.4),
    ("003", "... because the exit becomes over-confident: more tokens exit (86.3% vs 52.4%)",
     "lower", [at("asym-a0.7", TAU, "shallow"), at("asym_deepsup-a0.7", TAU, "shallow")], None),
    ("004", "Loss labels train block 1 best: block 1 val PPL loss 445 < distill 522 < softmax 736",
     "order", [ec("block_ppl/1")[i] for i in (1, 0, 2)], None),
    ("004", "Softmax confidence exits the most tokens (72.8%) ...", "highest", [ec("shallow")[i] for i in (2, 0, 1)], None),
    ("004", "... but has the worst final PPL", "highest", [ec("final_ppl")[i] for i in (2, 0, 1)], None),
    ("004", "Every method's final PPL is worse than block 0 alone (~565 -> 1072-1220)",
     "pairs_lower", [q for m in S004_METHODS for q in (f"seed004:{m}/block0_ppl", f"seed004:{m}/final_ppl")], None),
    ("004", "Exit classifier + loss labels has the best final PPL (adopted as the standard)",
     "order", [ec("final_ppl")[i] for i in (1, 0, 2)], None),
]
