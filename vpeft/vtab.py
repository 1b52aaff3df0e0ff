"""The VTAB-1k benchmark's tasks and groups, as the literature names them."""

from __future__ import annotations

GROUPS: dict[str, tuple[str, ...]] = {
    "natural": ("cifar100", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397"),
    "specialized": ("patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy"),
    "structured": (
        "clevr_count",
        "clevr_dist",
        "dmlab",
        "kitti",
        "dsprites_loc",
        "dsprites_ori",
        "smallnorb_azi",
        "smallnorb_ele",
    ),
}
TASKS: tuple[str, ...] = tuple(t for tasks in GROUPS.values() for t in tasks)
GROUP_OF: dict[str, str] = {t: g for g, tasks in GROUPS.items() for t in tasks}
SPLITS = ("train800", "val200", "train800val200", "test")
# protocol -> (split trained on, split evaluated on)
PROTOCOL_SPLITS = {"tune": ("train800", "val200"), "final": ("train800val200", "test")}

# VPT-deep's per-task prompt lengths on VTAB-1k (ViT-B/16 IN-21k). VPT's paper (Jia et al., ECCV 2022)
# does not print them: its authors released the per-task values as a spreadsheet instead (github
# KMnP/vpt README, "Hyperparameters for experiments in paper"; KMnP/vpt issue 4: "cannot fit the
# table in a page"). This table is VPT-deep's as visinf/adapter_plus (Steitz & Roth, CVPR 2024)
# configures it (conf/experiment/vtab/vpt.yaml, prompt dropout 0.1); VPT's own repository confirms
# the three tasks it shows (demo.ipynb, VPT-deep runs: dmlab 100, sun397 5, eurosat 100).
# VPT-shallow's per-task lengths were not found in any reachable primary source, so the VPT-shallow
# recipe tunes the length on val200 instead (conf/experiment/vtab1k_vpt_shallow.yaml).
VPT_DEEP_PROMPT_TOKENS: dict[str, int] = {
    "cifar100": 10,
    "caltech101": 10,
    "dtd": 10,
    "oxford_flowers102": 1,
    "oxford_iiit_pet": 1,
    "svhn": 50,
    "sun397": 5,
    "patch_camelyon": 100,
    "eurosat": 100,
    "resisc45": 10,
    "diabetic_retinopathy": 1,
    "clevr_count": 100,
    "clevr_dist": 200,
    "dmlab": 100,
    "kitti": 100,
    "dsprites_loc": 100,
    "dsprites_ori": 100,
    "smallnorb_azi": 200,
    "smallnorb_ele": 200,
}
# The resolver ${vpeft.vpt_tokens:<task>} (vpeft.config) reads this name: VPT-deep's table.
VPT_PROMPT_TOKENS = VPT_DEEP_PROMPT_TOKENS
# The distinct lengths of the VPT-deep table above: the candidates of the VPT-shallow tune grid.
VPT_PROMPT_LENGTHS: tuple[int, ...] = (1, 5, 10, 50, 100, 200)
