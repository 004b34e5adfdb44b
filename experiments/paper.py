"""Published numbers that `experiments.table` sets its cells against.

TABLE1: FT-SAM paper (Zhu et al., ICCV 2023), Table 1: CIFAR-10 (all 50,000 training images),
PreAct-ResNet18 (width 64), 10% poisoning, defenses on 5% benign data (2,500 images).
(C-Acc, ASR, DER) in %, keyed by this project's attack and defense names; "none" is the
backdoored model (C-Acc, ASR). All ten attacks (CLA is `lc`, Trojan `trojannn`) and nine
defenses (AC `ac`, NC `nc`, ABL `abl` among them); CLP, IKD, FST and PAM are not in that table.
Transcribed from `../shared/reference/ftsam-paper.md` (Table 1; `tests/test_table_render.py`
checks the transcription against that file).

TABLE3: the same paper's Table 3 (benign-ratio ablation, FT and FT-SAM at 10%, 5% and 1% benign
data, rho 2), (C-Acc, ASR, DER) in %, keyed by ratio, attack and defense. Its backdoored row is
shifted by a column from SIG on (see the reference notes), so the No-defense numbers set beside
it are Table 1's; its 5% cells equal Table 1's C-Acc and ASR.
"""

from __future__ import annotations

PAPER_TABLE1_SETTING = ("the FT-SAM paper's Table 1: CIFAR-10 (50,000 training images), "
                        "PreAct-ResNet18 width 64, 5% benign = 2,500 images")

TABLE1: dict[str, dict[str, tuple[float, ...]]] = {
    "badnets": {"none": (91.82, 93.79), "ft": (90.29, 1.70, 95.28), "fp": (91.77, 0.84, 96.45),
                "nad": (88.82, 1.96, 94.42), "ac": (48.84, 16.57, 67.12),
                "nc": (57.22, 0.90, 79.14), "anp": (91.65, 3.83, 94.89),
                "abl": (80.10, 0.00, 91.03), "ibau": (87.43, 4.48, 92.46),
                "ftsam": (92.21, 1.63, 96.08)},
    "badnets_a2a": {"none": (91.89, 74.42), "ft": (91.07, 1.16, 86.22), "fp": (92.05, 1.31, 86.56),
                    "nad": (90.73, 1.61, 85.83), "ac": (87.23, 67.03, 51.37),
                    "nc": (89.79, 1.11, 85.61), "anp": (92.33, 2.56, 85.93),
                    "abl": (44.39, 40.65, 43.14), "ibau": (89.39, 1.29, 85.32),
                    "ftsam": (91.87, 1.03, 86.69)},
    "blended": {"none": (93.44, 97.71), "ft": (92.48, 82.22, 57.26), "fp": (92.57, 8.32, 94.26),
                "nad": (92.09, 55.04, 70.66), "ac": (88.82, 95.10, 49.00),
                "nc": (91.91, 84.31, 55.94), "anp": (93.00, 57.38, 69.95),
                "abl": (74.31, 0.10, 89.24), "ibau": (88.24, 6.00, 93.26),
                "ftsam": (92.44, 4.91, 95.90)},
    "input_aware": {"none": (94.03, 98.35), "ft": (93.00, 65.85, 65.74),
                    "fp": (94.05, 10.95, 93.70), "nad": (94.08, 10.43, 93.96),
                    "ac": (51.37, 90.94, 32.38), "nc": (94.11, 98.98, 50.00),
                    "anp": (94.06, 11.10, 93.63), "abl": (50.58, 98.82, 28.28),
                    "ibau": (89.91, 8.92, 92.66), "ftsam": (93.76, 1.07, 98.51)},
    "lf": {"none": (93.01, 99.06), "ft": (92.37, 93.89, 52.26), "fp": (92.05, 21.32, 88.39),
           "nad": (91.72, 75.47, 61.15), "ac": (52.28, 94.34, 31.99), "nc": (93.01, 99.06, 50.00),
           "anp": (92.53, 26.38, 86.10), "abl": (71.68, 0.86, 88.44), "ibau": (88.92, 11.99, 91.49),
           "ftsam": (91.07, 3.81, 96.65)},
    "sig": {"none": (84.49, 97.87), "ft": (90.47, 5.74, 96.06), "fp": (90.81, 7.06, 95.41),
            "nad": (90.05, 6.60, 95.63), "ac": (81.33, 98.23, 48.42), "nc": (84.50, 97.87, 50.00),
            "anp": (83.87, 97.24, 50.00), "abl": (48.06, 0.00, 80.72), "ibau": (85.87, 1.32, 98.27),
            "ftsam": (91.16, 0.80, 98.53)},
    "wanet": {"none": (92.80, 98.90), "ft": (93.14, 1.26, 98.82), "fp": (92.94, 0.66, 99.12),
              "nad": (93.07, 0.73, 99.08), "ac": (52.81, 11.86, 73.52), "nc": (92.80, 98.90, 50.00),
              "anp": (93.24, 1.54, 98.68), "abl": (67.23, 92.97, 40.18),
              "ibau": (90.70, 0.88, 97.96), "ftsam": (92.87, 0.96, 98.97)},
    "lc": {"none": (84.55, 99.93), "ft": (90.38, 10.76, 94.59), "fp": (90.67, 78.72, 60.61),
           "nad": (90.01, 8.53, 95.70), "ac": (81.57, 99.11, 48.92), "nc": (90.87, 4.56, 97.69),
           "anp": (82.55, 0.18, 98.88), "abl": (68.14, 0.00, 91.76), "ibau": (85.66, 18.99, 90.47),
           "ftsam": (90.72, 3.52, 98.21)},
    "ssba": {"none": (92.88, 97.07), "ft": (92.47, 90.04, 53.31), "fp": (92.21, 20.27, 88.07),
             "nad": (92.15, 70.77, 62.79), "ac": (46.75, 67.63, 41.65), "nc": (92.88, 97.07, 50.00),
             "anp": (92.02, 16.18, 90.01), "abl": (79.87, 0.33, 91.86),
             "ibau": (86.53, 2.89, 93.91), "ftsam": (92.12, 2.80, 96.75)},
    "trojannn": {"none": (93.47, 99.99), "ft": (92.59, 35.50, 81.80), "fp": (92.24, 67.73, 65.51),
                 "nad": (92.18, 5.77, 96.47), "ac": (89.47, 100.00, 48.00),
                 "nc": (91.85, 51.03, 73.67), "anp": (92.71, 84.82, 57.20),
                 "abl": (70.70, 0.02, 88.60), "ibau": (89.29, 0.54, 97.63),
                 "ftsam": (92.75, 4.12, 97.57)},
}


PAPER_TABLE3_SETTING = ("the FT-SAM paper's Table 3: CIFAR-10 (50,000 training images), "
                        "PreAct-ResNet18 width 64, rho 2")

TABLE3: dict[float, dict[str, dict[str, tuple[float, ...]]]] = {
    0.1: {"badnets": {"ft": (91.67, 1.17, 96.24), "ftsam": (91.94, 1.26, 96.27)},
          "badnets_a2a": {"ft": (90.42, 1.61, 85.67), "ftsam": (92.46, 1.01, 86.71)},
          "blended": {"ft": (92.62, 77.20, 59.85), "ftsam": (92.53, 3.94, 96.43)},
          "input_aware": {"ft": (94.17, 10.44, 93.96), "ftsam": (94.22, 0.93, 98.71)},
          "lf": {"ft": (92.12, 69.22, 64.47), "ftsam": (92.64, 3.83, 97.43)},
          "sig": {"ft": (91.18, 0.88, 96.77), "ftsam": (91.46, 1.13, 96.78)},
          "wanet": {"ft": (93.57, 1.50, 99.24), "ftsam": (93.23, 0.78, 99.48)}},
    0.05: {"badnets": {"ft": (90.29, 1.70, 95.28), "ftsam": (92.21, 1.63, 96.08)},
           "badnets_a2a": {"ft": (91.07, 1.16, 86.22), "ftsam": (91.87, 1.03, 86.69)},
           "blended": {"ft": (92.48, 82.22, 57.26), "ftsam": (92.44, 4.91, 95.90)},
           "input_aware": {"ft": (93.00, 65.85, 65.74), "ftsam": (93.76, 1.07, 98.51)},
           "lf": {"ft": (92.37, 93.89, 52.26), "ftsam": (91.07, 3.81, 96.65)},
           "sig": {"ft": (90.47, 5.74, 93.98), "ftsam": (91.16, 0.80, 96.80)},
           "wanet": {"ft": (93.14, 1.26, 99.20), "ftsam": (92.87, 0.96, 99.22)}},
    0.01: {"badnets": {"ft": (89.25, 6.14, 92.54), "ftsam": (88.96, 1.29, 94.82)},
           "badnets_a2a": {"ft": (91.98, 1.42, 86.50), "ftsam": (90.43, 1.12, 85.92)},
           "blended": {"ft": (92.09, 87.98, 54.19), "ftsam": (90.83, 3.01, 96.05)},
           "input_aware": {"ft": (92.23, 69.51, 63.52), "ftsam": (93.12, 0.81, 98.31)},
           "lf": {"ft": (92.36, 98.87, 49.77), "ftsam": (90.88, 4.64, 96.14)},
           "sig": {"ft": (87.80, 3.07, 93.99), "ftsam": (88.31, 1.00, 95.27)},
           "wanet": {"ft": (92.65, 9.79, 94.69), "ftsam": (90.79, 0.91, 98.20)}},
}
